//! compose: captions (or an image set) -> prompts.
//!
//! A template such as `a photo of {class}, {caption}` is filled per source row. `{class}` is the
//! prompt name of the row's class (from a class file, e.g. "kite (bird of prey)"), `{class_id}` the
//! folder id, and any other `{column}` a column of the source manifest. `{{` and `}}` escape braces.
//! With `per_class = N` the node emits exactly N prompts per class, cycling through that class's
//! source rows, or with no source at all (the class-name baseline of the paper makes 1300 per class).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ArtifactType, InputSlot, NodeError, NodeKind, ParamError, RunContext, RunSummary};
use crate::data::table::write_csv;
use crate::data::{imagefolder, ClassNames, CsvTable};

pub struct Compose;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComposeParams {
    pub template: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// Class file (id,name CSV); defaults to the class file of the source dataset, if any.
    #[serde(default)]
    pub classes: Option<String>,
    #[serde(default)]
    pub per_class: Option<u64>,
}

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "source",
    accepts: &[ArtifactType::Captions, ArtifactType::Images],
    many: false,
    required: false,
}];

/// Columns a captions artifact always has, known before anything runs.
pub const CAPTION_COLUMNS: &[&str] = &["id", "class", "caption", "tokens"];
/// Placeholders that are not columns but derived from the class.
const DERIVED: &[&str] = &["class", "class_id"];

impl NodeKind for Compose {
    fn name(&self) -> &'static str {
        "compose"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> &'static [InputSlot] {
        INPUTS
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Prompts
    }
    fn param_names(&self) -> &'static [&'static str] {
        &["template", "negative_prompt", "classes", "per_class"]
    }
    fn file_params(&self) -> &'static [&'static str] {
        &["classes"]
    }
    fn resolve_params(&self, table: &toml::Table) -> Result<serde_json::Value, ParamError> {
        let value = super::resolve_typed::<ComposeParams>(table)?;
        let p: ComposeParams = serde_json::from_value(value.clone()).unwrap();
        for (key, text) in [
            ("template", &p.template),
            ("negative_prompt", &p.negative_prompt),
        ] {
            Template::parse(text).map_err(|message| ParamError {
                key: Some(key.into()),
                message,
            })?;
        }
        if p.per_class == Some(0) {
            return Err(ParamError {
                key: Some("per_class".into()),
                message: "must be at least 1".into(),
            });
        }
        Ok(value)
    }
    fn validate(
        &self,
        params: &serde_json::Value,
        inputs: &BTreeMap<String, Vec<ArtifactType>>,
    ) -> Result<(), ParamError> {
        let p: ComposeParams = serde_json::from_value(params.clone()).map_err(|e| ParamError {
            key: None,
            message: e.to_string(),
        })?;
        let source = inputs.get("source").and_then(|v| v.first()).copied();
        if source.is_none() && p.per_class.is_none() {
            return Err(ParamError {
                key: None,
                message: "needs a `source` (captions or images) or `per_class = N`".into(),
            });
        }
        // Captions have a fixed set of columns, so a bad placeholder is caught before running.
        // Image manifests may carry extra provenance columns: those are checked when the node runs.
        let known: Option<&[&str]> = match source {
            Some(ArtifactType::Captions) => Some(CAPTION_COLUMNS),
            None => Some(&[]),
            _ => None,
        };
        if let Some(columns) = known {
            for (key, text) in [
                ("template", &p.template),
                ("negative_prompt", &p.negative_prompt),
            ] {
                let t = Template::parse(text).expect("checked in resolve_params");
                t.check_columns(columns, source)
                    .map_err(|message| ParamError {
                        key: Some(key.into()),
                        message,
                    })?;
            }
        }
        Ok(())
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<RunSummary, NodeError> {
        let p: ComposeParams = ctx.params()?;
        let source = ctx.inputs.get("source").and_then(|v| v.first()).cloned();
        let classes_path = match (&p.classes, &source) {
            (Some(c), _) => Some(ctx.resolve_file(c)),
            (None, Some(a)) => a.classes.clone(),
            (None, None) => None,
        };
        let classes = match &classes_path {
            Some(path) => {
                Some(ClassNames::read(path).map_err(|e| NodeError::Failed(e.to_string()))?)
            }
            None => None,
        };
        let table = match &source {
            Some(a) => Some(read_source(a.ty, &a.dir)?),
            None => None,
        };
        let template = Template::parse(&p.template).map_err(NodeError::Failed)?;
        let negative = Template::parse(&p.negative_prompt).map_err(NodeError::Failed)?;
        let columns: Vec<&str> = table
            .as_ref()
            .map(|t| t.headers.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let source_ty = source.as_ref().map(|a| a.ty);
        for (what, t) in [("template", &template), ("negative_prompt", &negative)] {
            t.check_columns(&columns, source_ty)
                .map_err(|m| NodeError::Failed(format!("node `{}`: {what}: {m}", ctx.node)))?;
        }
        let class_name = |id: &str| -> String {
            classes
                .as_ref()
                .map(|c| c.name(id).to_string())
                .unwrap_or_else(|| id.to_string())
        };

        let mut out: Vec<[String; 5]> = Vec::new();
        let fill = |row: Option<&csv::StringRecord>, class_id: &str| -> (String, String) {
            let lookup = |name: &str| -> String {
                match name {
                    "class" => class_name(class_id),
                    "class_id" => class_id.to_string(),
                    col => {
                        let t = table.as_ref().unwrap();
                        let i = t.column(col).unwrap();
                        row.and_then(|r| r.get(i)).unwrap_or("").to_string()
                    }
                }
            };
            (template.render(&lookup), negative.render(&lookup))
        };
        match (&table, p.per_class) {
            (Some(t), None) => {
                let id = t
                    .require("id")
                    .map_err(|e| NodeError::Failed(e.to_string()))?;
                let class = t
                    .require("class")
                    .map_err(|e| NodeError::Failed(e.to_string()))?;
                for row in &t.rows {
                    let (prompt, neg) = fill(Some(row), &row[class]);
                    out.push([
                        row[id].to_string(),
                        row[class].to_string(),
                        prompt,
                        neg,
                        row[id].to_string(),
                    ]);
                }
            }
            (Some(t), Some(n)) => {
                let id = t
                    .require("id")
                    .map_err(|e| NodeError::Failed(e.to_string()))?;
                let class = t
                    .require("class")
                    .map_err(|e| NodeError::Failed(e.to_string()))?;
                let mut by_class: BTreeMap<&str, Vec<&csv::StringRecord>> = BTreeMap::new();
                for row in &t.rows {
                    by_class.entry(&row[class]).or_default().push(row);
                }
                for (class_id, rows) in by_class.iter_mut() {
                    rows.sort_by(|a, b| a[id].cmp(&b[id]));
                    for k in 0..n as usize {
                        let row = rows[k % rows.len()];
                        let (prompt, neg) = fill(Some(row), class_id);
                        out.push([
                            format!("{class_id}/{k:06}"),
                            class_id.to_string(),
                            prompt,
                            neg,
                            row[id].to_string(),
                        ]);
                    }
                }
            }
            (None, Some(n)) => {
                let Some(c) = &classes else {
                    return Err(NodeError::Failed(format!(
                        "node `{}`: per_class without a source needs `classes = \"<class file>\"`",
                        ctx.node
                    )));
                };
                for class_id in &c.ids {
                    for k in 0..n as usize {
                        let (prompt, neg) = fill(None, class_id);
                        out.push([
                            format!("{class_id}/{k:06}"),
                            class_id.clone(),
                            prompt,
                            neg,
                            String::new(),
                        ]);
                    }
                }
            }
            (None, None) => unreachable!("validated: a source or per_class"),
        }
        out.sort_by(|a, b| a[0].cmp(&b[0]));
        let path = ctx.out.join("prompts.csv");
        write_csv(
            &path,
            &["id", "class", "prompt", "negative_prompt", "source_id"],
            &out,
        )
        .map_err(|e| NodeError::Failed(e.to_string()))?;
        let mut summary = RunSummary::default();
        summary.counts.insert("prompts".into(), out.len() as u64);
        Ok(summary)
    }
}

/// Reads a table artifact's rows: `captions.csv`, `prompts.csv`, an image `manifest.csv`, or a bare ImageFolder
/// split (a dataset), listed on the fly.
pub fn read_source(ty: ArtifactType, dir: &Path) -> Result<CsvTable, NodeError> {
    let file = dir.join(ty.main_file());
    if file.exists() || ty != ArtifactType::Images {
        return CsvTable::read(&file).map_err(|e| NodeError::Failed(e.to_string()));
    }
    let items = imagefolder::scan(dir).map_err(|e| NodeError::Failed(e.to_string()))?;
    Ok(CsvTable {
        path: dir.to_path_buf(),
        headers: vec!["id".into(), "path".into(), "class".into()],
        rows: items
            .into_iter()
            .map(|i| csv::StringRecord::from(vec![i.id, i.path, i.class]))
            .collect(),
    })
}

/// A parsed template: literal text and `{placeholder}` segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    Field(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(ch) if ch.is_alphanumeric() || ch == '_' => name.push(ch),
                            Some(ch) => {
                                return Err(format!(
                                    "template `{text}`: invalid character `{ch}` in placeholder `{{{name}`; placeholders are {{column_name}}, use {{{{ and }}}} for literal braces"
                                ))
                            }
                            None => {
                                return Err(format!(
                                    "template `{text}`: unclosed placeholder `{{{name}`; close it with `}}` or write {{{{ for a literal brace"
                                ))
                            }
                        }
                    }
                    if name.is_empty() {
                        return Err(format!("template `{text}`: empty placeholder `{{}}`"));
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Text(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Field(name));
                }
                '}' => {
                    return Err(format!(
                        "template `{text}`: unmatched `}}`; write }}}} for a literal brace"
                    ))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(Template { segments })
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// Every placeholder must be `class`, `class_id` or a column of the source.
    pub fn check_columns(
        &self,
        columns: &[&str],
        source: Option<ArtifactType>,
    ) -> Result<(), String> {
        for field in self.fields() {
            if DERIVED.contains(&field) || columns.contains(&field) {
                continue;
            }
            let mut all: Vec<&str> = DERIVED.to_vec();
            all.extend(columns.iter().copied().filter(|c| *c != "class"));
            let origin = match source {
                Some(t) => format!("the {t} source"),
                None => "a node without a source (only {class} and {class_id} exist)".to_string(),
            };
            let mut msg = format!(
                "placeholder `{{{field}}}` has no column in {origin}; available: {}",
                all.iter()
                    .map(|c| format!("{{{c}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(c) = crate::config::closest(field, all.iter().copied()) {
                msg.push_str(&format!("; did you mean `{{{c}}}`?"));
            }
            return Err(msg);
        }
        Ok(())
    }

    pub fn render(&self, lookup: &dyn Fn(&str) -> String) -> String {
        let mut s = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => s.push_str(t),
                Segment::Field(f) => s.push_str(&lookup(f)),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fills_fields_and_escapes() {
        let t = Template::parse("a photo of {class}, {caption} {{x}}").unwrap();
        let out = t.render(&|f| match f {
            "class" => "tench".into(),
            "caption" => "a fish in a net".into(),
            _ => unreachable!(),
        });
        assert_eq!(out, "a photo of tench, a fish in a net {x}");
    }

    #[test]
    fn template_errors_name_the_template() {
        let e = Template::parse("a photo of {class").unwrap_err();
        assert!(e.contains("a photo of {class"), "{e}");
        let t = Template::parse("a photo of {clas}").unwrap();
        let e = t
            .check_columns(CAPTION_COLUMNS, Some(ArtifactType::Captions))
            .unwrap_err();
        assert!(e.contains("did you mean `{class}`"), "{e}");
    }
}
