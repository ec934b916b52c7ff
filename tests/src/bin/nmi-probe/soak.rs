//! `nmi-probe soak`: token requests on kept-alive connections, as an SDK's connection pool makes them, every answer
//! checked: a bound pod must get tokens of its own identity and nothing else, an unbound one IMDS's "Identity not
//! found" and nothing else. Prints one JSON summary.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use nmi_testkit::imds_emulator::jwt_claims;
use serde::Serialize;

#[derive(Args)]
pub struct SoakArgs {
    /// The IMDS base URL the pod calls.
    #[arg(long, default_value = "http://169.254.169.254")]
    url: String,
    /// Requests in all, over the threads.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Threads, each with its own kept-alive connection.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The client id every token must be for; without it, every answer must be 400 "Identity not found".
    #[arg(long = "expect-client-id")]
    expect_client_id: Option<String>,
    #[arg(long, default_value = "https://vault.azure.net")]
    resource: String,
    /// A new resource for every request (`https://r<N>.<resource host>/`): every request is a cache miss, the way a
    /// pod would flood IMDS through the agent.
    #[arg(long = "distinct-resources")]
    distinct_resources: bool,
    /// Ask for `/metadata/instance` instead of tokens (forwarded to IMDS as the node); every answer must be 200.
    #[arg(long, conflicts_with_all = ["expect_client_id", "distinct_resources"])]
    instance: bool,
}

/// What the soak saw.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub requests: usize,
    /// Answers that were exactly what this pod must get.
    pub expected: usize,
    /// Tokens for an identity that is not this pod's (or any token for an unbound pod).
    pub wrong_identity: usize,
    /// Anything else: errors, timeouts, other statuses.
    pub failed: usize,
    pub statuses: BTreeMap<String, usize>,
    pub first_failure: Option<String>,
    pub max_latency_ms: f64,
    pub elapsed_ms: f64,
}

enum Verdict {
    Expected,
    WrongIdentity(String),
    Failed(String),
}

pub fn soak(o: &SoakArgs) {
    let base = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=",
        o.url.trim_end_matches('/')
    );
    let next = AtomicUsize::new(0);
    let instance = format!(
        "{}/metadata/instance?api-version=2021-02-01",
        o.url.trim_end_matches('/')
    );
    let url_for = |n: usize| {
        if o.instance {
            instance.clone()
        } else if o.distinct_resources {
            format!("{base}https://r{n}.flood.example/")
        } else {
            format!("{base}{}", o.resource)
        }
    };
    let summary = Mutex::new(Summary::default());
    let started = Instant::now();
    let threads = o.threads.max(1);
    thread::scope(|s| {
        for t in 0..threads {
            let (url_for, next, summary) = (&url_for, &next, &summary);
            let count = o.requests / threads + usize::from(t < o.requests % threads);
            s.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                for _ in 0..count {
                    let asked = Instant::now();
                    let url = url_for(next.fetch_add(1, Ordering::Relaxed));
                    let (status, verdict) = if o.instance {
                        ask_instance(&agent, &url)
                    } else {
                        ask(&agent, &url, o.expect_client_id.as_deref())
                    };
                    let took = asked.elapsed().as_secs_f64() * 1000.0;
                    let mut sum = summary.lock().unwrap_or_else(|e| e.into_inner());
                    sum.requests += 1;
                    sum.max_latency_ms = sum.max_latency_ms.max(took);
                    *sum.statuses.entry(status).or_default() += 1;
                    match verdict {
                        Verdict::Expected => sum.expected += 1,
                        Verdict::WrongIdentity(what) => {
                            sum.wrong_identity += 1;
                            sum.first_failure.get_or_insert(what);
                        }
                        Verdict::Failed(what) => {
                            sum.failed += 1;
                            sum.first_failure.get_or_insert(what);
                        }
                    }
                }
            });
        }
    });
    let mut summary = summary.into_inner().unwrap_or_else(|e| e.into_inner());
    summary.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    println!("{}", serde_json::to_string(&summary).expect("serialize"));
}

fn ask(agent: &ureq::Agent, url: &str, expect: Option<&str>) -> (String, Verdict) {
    let mut response = match agent.get(url).header("Metadata", "true").call() {
        Ok(r) => r,
        Err(e) => return ("error".into(), Verdict::Failed(e.to_string())),
    };
    let status = response.status().as_u16();
    let body = match response.body_mut().read_to_string() {
        Ok(b) => b,
        Err(e) => return (status.to_string(), Verdict::Failed(e.to_string())),
    };
    let appid = (status == 200)
        .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|v| v["access_token"].as_str().and_then(jwt_claims))
        .and_then(|c| c["appid"].as_str().map(str::to_owned));
    let verdict = match (expect, status, appid) {
        (Some(want), 200, Some(got)) if got.eq_ignore_ascii_case(want) => Verdict::Expected,
        (_, 200, Some(got)) => Verdict::WrongIdentity(format!("a token for {got}")),
        (None, 400, _) if body.contains("Identity not found") => Verdict::Expected,
        _ => Verdict::Failed(format!(
            "{status}: {}",
            body.chars().take(200).collect::<String>()
        )),
    };
    (status.to_string(), verdict)
}

fn ask_instance(agent: &ureq::Agent, url: &str) -> (String, Verdict) {
    match agent.get(url).header("Metadata", "true").call() {
        Ok(r) if r.status() == 200 => ("200".into(), Verdict::Expected),
        Ok(r) => (
            r.status().as_u16().to_string(),
            Verdict::Failed(format!("{}", r.status())),
        ),
        Err(e) => ("error".into(), Verdict::Failed(e.to_string())),
    }
}
