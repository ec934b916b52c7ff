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
        // A cluster-scoped object: /api/v1/nodes/{name}.
        [plural, name] => (None, *plural, Some(*name)),
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

pub(super) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
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
    if req.method() == Method::PATCH {
        return patch(shared, req).await;
    }
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

/// `PATCH` of one object with a JSON patch (RFC 6902; a failed `test` is a 422, as on a real API server), stored as
/// MODIFIED. With [`super::Options::forbid_writes`], a 403 as RBAC would answer.
async fn patch(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some(Target {
        resource,
        namespace,
        name: Some(name),
    }) = parse_path(&path)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route for PATCH {path}"),
        );
    };
    if shared.options.forbid_writes {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: cannot patch", resource.plural),
        );
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if content_type != "application/json-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake serves JSON patches only, not {content_type:?}"),
        );
    }
    let body = match http_body_util::BodyExt::collect(req.into_body()).await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let ops: json_patch::Patch = match serde_json::from_slice(&body) {
        Ok(ops) => ops,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
    };
    let key = Key {
        resource,
        namespace: namespace.unwrap_or_default(),
        name: name.clone(),
    };
    let mut store = shared.store();
    let Some(mut object) = store.objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", key.resource.plural),
        );
    };
    if let Err(e) = json_patch::patch(&mut object, &ops) {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("the JSON patch does not apply: {e}"),
        );
    }
    let event = store.write(object, "MODIFIED");
    // As in FakeApiServer::change: sent under the store lock.
    let _ = shared.events.send(Arc::clone(&event));
    drop(store);
    full(StatusCode::OK, &event.object)
}
