//! Bad input: every case gives a clear error (snapshot) naming the file, line and item and the
//! fix, and leaves a cache that already holds finished work untouched.
#![cfg(feature = "test-kinds")]

mod common;

use common::*;

const VALID: &str = r#"
[experiment]
name = "errors"

[datasets.demo]
root = "data"
splits = ["train"]

[nodes.captions]
kind = "test-items"
count = 4
tag = "a fish"

[nodes.prompts]
kind = "compose"
source = "captions"
template = "a photo of {class}, {caption}"

[nodes.score]
kind = "test-score"
from = "prompts"
"#;

/// (snapshot name, experiment text, extra arguments).
fn cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let v = VALID.to_string();
    vec![
        ("malformed_toml", v.replace("kind = \"compose\"", "kind = \"compose"), vec![]),
        ("unknown_top_level_key", format!("{v}\n[nodez.x]\nkind = \"compose\"\n"), vec![]),
        ("unknown_node_key", v.replace("template =", "templat ="), vec![]),
        ("unknown_node_kind", v.replace("kind = \"compose\"", "kind = \"compse\""), vec![]),
        ("dangling_reference", v.replace("source = \"captions\"", "source = \"caption\""), vec![]),
        (
            "cycle",
            format!("{v}\n[nodes.a]\nkind = \"compose\"\nsource = \"b\"\ntemplate = \"{{class}}\"\n\n[nodes.b]\nkind = \"compose\"\nsource = \"a\"\ntemplate = \"{{class}}\"\n"),
            vec![],
        ),
        ("type_mismatch", v.replace("from = \"prompts\"", "from = \"demo.train\""), vec![]),
        ("duplicate_node_name", format!("{v}\n[nodes.prompts]\nkind = \"compose\"\ntemplate = \"x\"\n"), vec![]),
        ("empty_sweep_axis", format!("{v}\n[sweep]\n\"prompts.template\" = []\n"), vec![]),
        ("sweep_unknown_parameter", format!("{v}\n[sweep]\n\"prompts.guidance\" = [1.0, 2.0]\n"), vec![]),
        ("sweep_unknown_node", format!("{v}\n[sweep]\n\"promts.template\" = [\"{{class}}\"]\n"), vec![]),
        ("template_placeholder_without_column", v.replace("{caption}", "{captoin}"), vec![]),
        ("template_unclosed_brace", v.replace("{caption}", "{caption"), vec![]),
        ("missing_required_parameter", v.replace("template = \"a photo of {class}, {caption}\"", ""), vec![]),
        ("wrong_parameter_type", v.replace("count = 4", "count = \"four\""), vec![]),
        ("missing_dataset_directory", format!("{v}\n[nodes.real]\nkind = \"compose\"\nsource = \"demo.train\"\ntemplate = \"{{class}}\"\n").replace("root = \"data\"", "root = \"nowhere\"\nprepare = \"cip data demo --out nowhere\""), vec![]),
        ("unknown_split", v.replace("from = \"prompts\"", "from = \"demo.test\""), vec![]),
        ("report_names_non_eval_node", format!("{v}\n[report]\neval = [\"prompts\"]\n"), vec![]),
        ("unreadable_cache_dir", v.clone(), vec!["--cache", "not-a-dir"]),
        ("unknown_variant", v.clone(), vec!["--variant", "nope"]),
        ("unknown_only_node", v.clone(), vec!["--only", "nope"]),
    ]
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_the_cache_intact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("data/train/n01440764")).unwrap();
    std::fs::write(root.join("data/train/n01440764/a.png"), b"not really a png").unwrap();
    std::fs::write(root.join("not-a-dir"), b"a file where the cache should be").unwrap();
    std::fs::write(root.join("exp.toml"), VALID).unwrap();
    let ok = cip(root, &["run", "exp.toml"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let cache = root.join(".cip/cache");
    let before = tree(&cache);
    assert!(!before.is_empty());

    let cases = cases();
    assert!(cases.len() >= 15);
    for (name, text, extra) in cases {
        std::fs::write(root.join("bad.toml"), &text).unwrap();
        let mut args = vec!["run", "bad.toml"];
        args.extend(extra);
        let out = cip(root, &args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: expected a usage error, got {:?}\n{}",
            out.status,
            stderr(&out)
        );
        assert!(
            stdout(&out).is_empty(),
            "{name}: nothing ran, nothing printed on stdout"
        );
        let message = stderr(&out).replace(&root.display().to_string(), "[DIR]");
        insta::assert_snapshot!(name, message);
        assert_eq!(tree(&cache), before, "{name}: the cache changed");
    }
    // A missing experiment file, too.
    let out = cip(root, &["plan", "missing.toml"]);
    insta::assert_snapshot!("missing_experiment_file", stderr(&out));
}
