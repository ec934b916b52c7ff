//! From a request to its answer: the path names a resource (and maybe one object), the query says list or watch.

use std::sync::{Arc, PoisonError};

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde_json::{Value, json};

use super::{
    LoggedRequest, Shared,
    query::{Filter, is_watch, query_pairs},
    store::{Key, Resource},
    watch,
};
use crate::http::{self, Body};

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    http::json(status, "application/json", body)
}

/// A Kubernetes `Status` object: how the API server reports a failure.
pub(super) fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

/// Parsed request path.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        resource: Resource {
            prefix,
            plural: plural.to_owned(),
        },
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

pub(super) fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    shared
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(LoggedRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
        });
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} is not served", req.method()),
        );
    }
    let Some(target) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route for {path}"),
        );
    };
    let params = query_pairs(&query);
    let filter = match Filter::parse(&params, target.namespace.clone()) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    match &target.name {
        Some(name) => get(shared, &target, name),
        None if is_watch(&params) => watch::open(shared, target.resource, filter, &params),
        None => list(shared, &target.resource, &filter),
    }
}

/// One object, or a 404 Status.
fn get(shared: &Shared, target: &Target, name: &str) -> Response<Body> {
    let key = Key {
        resource: target.resource.clone(),
        namespace: target.namespace.clone().unwrap_or_default(),
        name: name.to_owned(),
    };
    match shared.store().objects.get(&key) {
        Some(obj) => full(StatusCode::OK, obj),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", target.resource.plural),
        ),
    }
}

/// `<Kind>List` of the objects `filter` lets through, at the current resourceVersion.
fn list(shared: &Shared, resource: &Resource, filter: &Filter) -> Response<Body> {
    let store = shared.store();
    let (api_version, kind) = store.kind(resource);
    full(
        StatusCode::OK,
        &json!({
            "apiVersion": api_version,
            "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": store.list(resource, filter),
        }),
    )
}
