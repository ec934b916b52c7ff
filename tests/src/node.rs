//! In-process servers that live in a topology's node namespace: the IMDS emulator and the fake Kubernetes API
//! server, each on a Tokio runtime whose threads were born inside that namespace.
//!
//! Network namespace membership is per thread and inherited by the threads a thread creates, and a socket keeps the
//! namespace it was created in. So the runtime is built on a thread that entered the node namespace (its workers are
//! spawned from there), and every bind happens in a `block_on` on such a thread too.

use std::future::Future;
use std::net::SocketAddr;

use tokio::runtime::Runtime;

use crate::fake_apiserver::FakeApiServer;
use crate::imds_emulator::{Calls, EmulatedIdentity, Emulator, EmulatorConfig, Fault};
use crate::netns::Netns;

/// A Tokio runtime whose threads are in `netns`.
pub struct NodeRuntime {
    netns: Netns,
    rt: Option<Runtime>,
}

impl NodeRuntime {
    pub fn new(netns: &Netns) -> NodeRuntime {
        let rt = netns.run_in(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("nmie2e-node")
                .enable_all()
                .build()
                .expect("build a Tokio runtime in the node namespace")
        });
        NodeRuntime {
            netns: netns.clone(),
            rt: Some(rt),
        }
    }

    /// Runs `f` to completion on a thread inside the namespace, so that sockets it creates belong there.
    pub fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().expect("runtime alive");
        self.netns.run_in(|| rt.block_on(f))
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        // Servers may hold connections open (a delayed answer); do not wait for them.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The IMDS emulator (see [`crate::imds_emulator`]) serving from the node namespace.
pub struct NodeEmulator {
    // Field order is drop order: stop the server before its runtime.
    emulator: Emulator,
    _rt: NodeRuntime,
}

impl NodeEmulator {
    /// Serves `identities` (no system identity) on `listen` inside `node`.
    pub fn start(
        node: &Netns,
        listen: SocketAddr,
        identities: Vec<EmulatedIdentity>,
    ) -> NodeEmulator {
        Self::start_with(
            node,
            EmulatorConfig {
                listen,
                ..EmulatorConfig::new(identities)
            },
        )
    }

    /// Serves `config` (its `listen` inside `node`).
    pub fn start_with(node: &Netns, config: EmulatorConfig) -> NodeEmulator {
        let rt = NodeRuntime::new(node);
        let listen = config.listen;
        let emulator = rt
            .block_on(Emulator::start(config))
            .unwrap_or_else(|e| panic!("IMDS emulator: bind {listen} in {}: {e}", node.name));
        NodeEmulator { emulator, _rt: rt }
    }

    /// `http://ip:port`, for the agent's `--imds-url`.
    pub fn url(&self) -> String {
        self.emulator.url()
    }

    pub fn calls(&self) -> Calls {
        self.emulator.calls()
    }

    /// Token calls that asked for `client_id`.
    pub fn calls_for(&self, client_id: &str) -> u64 {
        self.calls()
            .by_client_id
            .get(client_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.emulator.push_faults(faults);
    }

    pub fn pending_faults(&self) -> Vec<Fault> {
        self.emulator.pending_faults()
    }
}

/// The fake Kubernetes API server on 127.0.0.1 of the node namespace (where the agent runs).
pub struct NodeApiServer {
    pub server: FakeApiServer,
    _rt: NodeRuntime,
}

impl NodeApiServer {
    pub fn start(node: &Netns) -> NodeApiServer {
        let rt = NodeRuntime::new(node);
        let server = rt.block_on(FakeApiServer::start());
        NodeApiServer { server, _rt: rt }
    }

    /// A kubeconfig for this server (plain HTTP, no credentials), as YAML.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n",
            self.server.url()
        )
    }
}
