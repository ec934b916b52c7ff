//! What one request asks for: its query parameters, whether it is a watch, and which objects (namespace,
//! `labelSelector`, `fieldSelector`).

use std::collections::HashMap;

use serde_json::Value;

/// `labelSelector` / `fieldSelector` / namespace restriction of one request.
pub(super) struct Filter {
    namespace: Option<String>,
    labels: Vec<(String, Op, String)>,
    fields: Vec<(String, Op, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Exists,
    NotExists,
}

impl Filter {
    pub fn parse(
        params: &HashMap<String, String>,
        namespace: Option<String>,
    ) -> Result<Filter, String> {
        let parse_terms =
            |s: Option<&String>, allow_exists: bool| -> Result<Vec<(String, Op, String)>, String> {
                let Some(s) = s.filter(|s| !s.is_empty()) else {
                    return Ok(Vec::new());
                };
                s.split(',')
                    .map(|term| {
                        let term = term.trim();
                        if let Some((k, v)) = term.split_once("!=") {
                            Ok((k.trim().to_owned(), Op::Ne, v.trim().to_owned()))
                        } else if let Some((k, v)) =
                            term.split_once("==").or_else(|| term.split_once('='))
                        {
                            Ok((k.trim().to_owned(), Op::Eq, v.trim().to_owned()))
                        } else if allow_exists && term.starts_with('!') {
                            Ok((term[1..].trim().to_owned(), Op::NotExists, String::new()))
                        } else if allow_exists && !term.contains(' ') && !term.contains('(') {
                            Ok((term.to_owned(), Op::Exists, String::new()))
                        } else {
                            Err(format!("unsupported selector term {term:?}"))
                        }
                    })
                    .collect()
            };
        Ok(Filter {
            namespace,
            labels: parse_terms(params.get("labelSelector"), true)?,
            fields: parse_terms(params.get("fieldSelector"), false)?,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let labels = &obj["metadata"]["labels"];
        let labels_ok = self.labels.iter().all(|(k, op, v)| {
            let have = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq => have == Some(v.as_str()),
                Op::Ne => have != Some(v.as_str()),
                Op::Exists => have.is_some(),
                Op::NotExists => have.is_none(),
            }
        });
        let fields_ok = self.fields.iter().all(|(path, op, v)| {
            let mut cur = obj;
            for part in path.split('.') {
                cur = &cur[part];
            }
            let have = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            match op {
                Op::Ne => have != *v,
                _ => have == *v,
            }
        });
        labels_ok && fields_ok
    }
}

/// The query's parameters, percent-decoded (leniently: a stray `%` stays as is).
pub(super) fn query_pairs(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// `watch=1` or `watch=true`.
pub(super) fn is_watch(params: &HashMap<String, String>) -> bool {
    params.get("watch").is_some_and(|v| v == "1" || v == "true")
}
