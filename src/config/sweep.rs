//! `[sweep]`: axes over node parameters, expanded into the cartesian product of variants.
//!
//! Two forms of axis:
//! - a value list for one parameter: `"synthetic.guidance" = [1.0, 1.5, 2.0]` (the dotted key may be
//!   quoted or not);
//! - a named axis whose values are named override sets, for variants that change several things
//!   at once (e.g. "real data" vs "class-name prompts" vs "caption prompts"):
//!   `[sweep.prompt]` / `cip = { "prompts.template" = "a photo of {class}, {caption}" }`.
//!
//! Variants are only a naming device: the planner keys every node, and equal keys are one node.

use indexmap::IndexMap;

use super::{suggest, valid_node_keys, RawNode, Resolver};

#[derive(Debug, Clone)]
pub struct Axis {
    /// `synthetic.guidance` for a list axis; the table name for a named axis.
    pub name: String,
    pub values: Vec<AxisValue>,
}

#[derive(Debug, Clone)]
pub struct AxisValue {
    pub label: String,
    /// (node, parameter, value, location of the value in the file).
    pub overrides: Vec<(String, String, toml::Value, Vec<String>)>,
}

type Override = (String, String, toml::Value, Vec<String>);

pub(super) fn parse_axes(
    r: &mut Resolver<'_, '_>,
    sweep: &toml::Table,
    raw: &IndexMap<String, RawNode>,
) -> Vec<Axis> {
    let mut axes = Vec::new();
    for (key, value) in sweep {
        // `synthetic.guidance = [...]` unquoted parses as a nested table keyed by the node.
        if let (Some(inner), true) = (value.as_table(), raw.contains_key(key)) {
            for (param, values) in inner {
                let at = vec!["sweep".to_string(), key.clone(), param.clone()];
                if let Some(axis) = list_axis(r, key, param, values, at, raw) {
                    axes.push(axis);
                }
            }
            continue;
        }
        if let Some((node, param)) = key.split_once('.') {
            let at = vec!["sweep".to_string(), key.clone()];
            if let Some(axis) = list_axis(r, node, param, value, at, raw) {
                axes.push(axis);
            }
            continue;
        }
        match value.as_table() {
            Some(named) => {
                if let Some(axis) = named_axis(r, key, named, raw) {
                    axes.push(axis);
                }
            }
            None => {
                let d = r
                    .map
                    .at_key(&["sweep", key], format!("sweep key `{key}` is not of the form `node.param`"))
                    .help(format!(
                        "write `\"<node>.<param>\" = [values]`, or a named axis [sweep.{key}] with one table per value"
                    ));
                r.push(d);
            }
        }
    }
    axes
}

fn check_target(
    r: &mut Resolver<'_, '_>,
    node: &str,
    param: &str,
    at: &[String],
    raw: &IndexMap<String, RawNode>,
) -> bool {
    let p: Vec<&str> = at.iter().map(|s| s.as_str()).collect();
    let Some(n) = raw.get(node) else {
        let names: Vec<&str> = raw.keys().map(|s| s.as_str()).collect();
        let d = r
            .map
            .at_key(
                &p,
                format!("sweep over `{node}.{param}`: there is no node `{node}`"),
            )
            .help(suggest(node, &names));
        r.push(d);
        return false;
    };
    let valid: Vec<&str> = valid_node_keys(n.kind)
        .into_iter()
        .filter(|k| *k != "kind")
        .collect();
    if !valid.contains(&param) {
        let d = r
            .map
            .at_key(
                &p,
                format!(
                    "sweep over `{node}.{param}`: node `{node}` (kind {}) has no parameter `{param}`",
                    n.kind.name()
                ),
            )
            .help(suggest(param, &valid));
        r.push(d);
        return false;
    }
    true
}

fn list_axis(
    r: &mut Resolver<'_, '_>,
    node: &str,
    param: &str,
    values: &toml::Value,
    at: Vec<String>,
    raw: &IndexMap<String, RawNode>,
) -> Option<Axis> {
    if !check_target(r, node, param, &at, raw) {
        return None;
    }
    let p: Vec<&str> = at.iter().map(|s| s.as_str()).collect();
    let Some(list) = values.as_array() else {
        let d = r
            .map
            .at_value(
                &p,
                format!("sweep axis `{node}.{param}` must be a list of values"),
            )
            .help(format!("e.g. \"{node}.{param}\" = [1.0, 2.0]"));
        r.push(d);
        return None;
    };
    if list.is_empty() {
        let d = r
            .map
            .at_value(&p, format!("sweep axis `{node}.{param}` is empty"))
            .help("give at least one value, or remove the axis");
        r.push(d);
        return None;
    }
    Some(Axis {
        name: format!("{node}.{param}"),
        values: list
            .iter()
            .map(|v| AxisValue {
                label: value_label(v),
                overrides: vec![(node.to_string(), param.to_string(), v.clone(), at.clone())],
            })
            .collect(),
    })
}

fn named_axis(
    r: &mut Resolver<'_, '_>,
    axis: &str,
    named: &toml::Table,
    raw: &IndexMap<String, RawNode>,
) -> Option<Axis> {
    if named.is_empty() {
        let d = r
            .map
            .at_key(&["sweep", axis], format!("sweep axis `{axis}` is empty"))
            .help("give at least one named value, or remove the axis");
        r.push(d);
        return None;
    }
    let mut values = Vec::new();
    let mut ok = true;
    for (label, set) in named {
        let Some(set) = set.as_table() else {
            let d = r
                .map
                .at_value(
                    &["sweep", axis, label],
                    format!("value `{label}` of sweep axis `{axis}` must be a table of overrides"),
                )
                .help(format!("e.g. {label} = {{ \"node.param\" = value }}"));
            r.push(d);
            ok = false;
            continue;
        };
        let mut overrides: Vec<Override> = Vec::new();
        for (k, v) in set {
            let base = vec![
                "sweep".to_string(),
                axis.to_string(),
                label.clone(),
                k.clone(),
            ];
            if let (Some(inner), true) = (v.as_table(), raw.contains_key(k)) {
                for (param, pv) in inner {
                    let mut at = base.clone();
                    at.push(param.clone());
                    if check_target(r, k, param, &at, raw) {
                        overrides.push((k.clone(), param.clone(), pv.clone(), at));
                    } else {
                        ok = false;
                    }
                }
            } else if let Some((node, param)) = k.split_once('.') {
                if check_target(r, node, param, &base, raw) {
                    overrides.push((node.to_string(), param.to_string(), v.clone(), base));
                } else {
                    ok = false;
                }
            } else {
                let p: Vec<&str> = base.iter().map(|s| s.as_str()).collect();
                let d = r
                    .map
                    .at_key(&p, format!("override `{k}` in sweep value `{axis}.{label}` is not of the form `node.param`"))
                    .help("quote it: \"node.param\" = value");
                r.push(d);
                ok = false;
            }
        }
        values.push(AxisValue {
            label: label.clone(),
            overrides,
        });
    }
    ok.then(|| Axis {
        name: axis.to_string(),
        values,
    })
}

/// A short, file-independent label for a swept value.
pub fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(value_label).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// The cartesian product of the axes, first axis slowest. No axes: one empty variant.
pub(super) fn expand(axes: &[Axis]) -> Vec<(Vec<(String, String)>, Vec<Override>)> {
    let mut out: Vec<(Vec<(String, String)>, Vec<Override>)> = vec![(Vec::new(), Vec::new())];
    for axis in axes {
        let mut next = Vec::with_capacity(out.len() * axis.values.len());
        for (labels, overrides) in &out {
            for value in &axis.values {
                let mut l = labels.clone();
                l.push((axis.name.clone(), value.label.clone()));
                let mut o = overrides.clone();
                o.extend(value.overrides.iter().cloned());
                next.push((l, o));
            }
        }
        out = next;
    }
    out
}
