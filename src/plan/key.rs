//! Node keys: blake3 over a canonical encoding of [`KeyFields`].
//!
//! Whatever changes a node's result is in the key: the kind and its implementation version, the
//! resolved parameters (defaults filled in), the keys of its inputs, the digests of its models,
//! the fingerprints of its datasets and the content of files its parameters name. What changes
//! only speed (batch size, threads, device, executor) is NOT in the key: retuning a run must never
//! invalidate hours of cached work. A golden test pins the encoding; any change to it is a
//! deliberate bump of [`KEY_SCHEMA`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the key encoding itself.
pub const KEY_SCHEMA: u32 = 1;

/// Domain separation, so a node key can never collide with another blake3 use in cip.
const KEY_DOMAIN: &str = "cip node key";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyFields {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    /// Result-changing parameters only, defaults filled in.
    pub params: serde_json::Value,
    /// Slot -> `node:<kind>:<key>` or `dataset:<fingerprint>` per reference, in order.
    pub inputs: BTreeMap<String, Vec<String>>,
    /// Slot -> the model directory's recorded digest.
    pub models: BTreeMap<String, String>,
    /// Parameter name -> blake3 of the file it names.
    pub files: BTreeMap<String, String>,
    /// The experiment seed, for kinds whose results depend on it; otherwise absent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seed: Option<u64>,
}

impl KeyFields {
    pub fn key(&self) -> String {
        let value = serde_json::to_value(self).expect("key fields serialise");
        let mut hasher = blake3::Hasher::new_derive_key(KEY_DOMAIN);
        hasher.update(canonical_json(&value).as_bytes());
        hasher.finalize().to_hex().to_string()
    }
}

/// JSON with object keys sorted at every level and no whitespace: one text per value, whatever the
/// map implementation or insertion order.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// Field-by-field differences between two key-field records, as `path: old -> new` lines, for
/// "why does this node rerun".
pub fn diff(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_at("", old, new, &mut out);
    out
}

fn diff_at(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    match (old, new) {
        (Object(a), Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_at(&p, x, y, out),
                    (Some(x), None) => out.push(format!("{p}: {} -> (absent)", short(x))),
                    (None, Some(y)) => out.push(format!("{p}: (absent) -> {}", short(y))),
                    (None, None) => {}
                }
            }
        }
        // Input and model references are hashes: name what changed rather than print them.
        (a, b) if a != b && path.starts_with("inputs.") => {
            out.push(format!("{path}: upstream result changed"))
        }
        (a, b) if a != b && path.starts_with("models.") => {
            out.push(format!("{path}: model digest changed"))
        }
        (a, b) if a != b && path.starts_with("files.") => {
            out.push(format!("{path}: file content changed"))
        }
        (a, b) if a != b => out.push(format!("{path}: {} -> {}", short(a), short(b))),
        _ => {}
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = canonical_json(v);
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(77).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixed_node() -> KeyFields {
        KeyFields {
            schema: KEY_SCHEMA,
            kind: "generate".into(),
            kind_version: 1,
            params: json!({"guidance": 7.5, "steps": 50, "scheduler": "pndm", "size": [512, 512]}),
            inputs: BTreeMap::from([(
                "prompts".to_string(),
                vec!["node:compose:9f8e".to_string()],
            )]),
            models: BTreeMap::from([("model".to_string(), "ab12".to_string())]),
            files: BTreeMap::new(),
            seed: Some(0),
        }
    }

    /// Golden: pins the encoding. If this fails, the key encoding changed: bump KEY_SCHEMA on
    /// purpose (every cached entry is then recomputed) and update the expected text and hex.
    #[test]
    fn golden_key_encoding() {
        let fields = fixed_node();
        let value = serde_json::to_value(&fields).unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"files":{},"inputs":{"prompts":["node:compose:9f8e"]},"kind":"generate","kind_version":1,"models":{"model":"ab12"},"params":{"guidance":7.5,"scheduler":"pndm","size":[512,512],"steps":50},"schema":1,"seed":0}"#
        );
        insta::assert_snapshot!("golden_node_key", fields.key());
    }

    #[test]
    fn key_ignores_map_order_but_not_values() {
        let a = fixed_node();
        let mut b = fixed_node();
        b.params = json!({"steps": 50, "size": [512, 512], "scheduler": "pndm", "guidance": 7.5});
        assert_eq!(a.key(), b.key());
        b.params["guidance"] = json!(2.0);
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn diff_names_changed_fields() {
        let a = serde_json::to_value(fixed_node()).unwrap();
        let mut b = a.clone();
        b["params"]["guidance"] = json!(2.0);
        assert_eq!(
            diff(&a, &b),
            vec!["params.guidance: 7.5 -> 2.0".to_string()]
        );
    }
}
