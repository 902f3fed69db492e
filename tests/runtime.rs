//! The ONNX Runtime layer: library discovery, providers, sessions, model directories and
//! `cip models check`. Fixture: tests/fixtures/runtime/toy-sd, written by
//! `python -m cip_export.runtime_fixtures` (run from models/).
//!
//! Tests that open sessions need the ONNX Runtime library; they find it like cip does (a `.venv`
//! above the checkout, `make setup` creates one). Error messages are pinned with insta snapshots,
//! with temporary and checkout paths replaced by placeholders.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use cip::runtime::{
    check_model_dir, open_session, runtime, Family, LibrarySearch, ModelDir, Provider,
    RuntimeError, SessionConfig, CPU_PROVIDER,
};
use ndarray::{Array1, Array2};
use ort::value::TensorRef;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runtime/toy-sd")
}

/// A copy of the fixture that a test may damage.
fn fixture_copy(tmp: &tempfile::TempDir) -> PathBuf {
    let dst = tmp.path().join("toy-sd");
    copy_dir(&fixture(), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The error message with machine-specific paths replaced, for snapshots.
fn message(error: RuntimeError, tmp: Option<&tempfile::TempDir>) -> String {
    let mut text = error.to_string();
    if let Some(tmp) = tmp {
        text = text.replace(&tmp.path().display().to_string(), "[TMP]");
    }
    text.replace(&fixture().display().to_string(), "[FIXTURE]")
}

fn cpu_single_thread() -> SessionConfig {
    SessionConfig {
        intra_threads: Some(1),
        ..SessionConfig::default()
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let path = dir.join("cip-model.toml");
    let mut table: toml::Table = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut table);
    fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

fn graph_tensors<'a>(
    table: &'a mut toml::Table,
    role: &str,
    direction: &str,
) -> &'a mut Vec<toml::Value> {
    table["graphs"][role][direction].as_array_mut().unwrap()
}

// ---------------------------------------------------------------- library discovery

fn empty_search(tmp: &tempfile::TempDir) -> LibrarySearch {
    LibrarySearch {
        ort_dylib_path: None,
        venv_search_starts: vec![tmp.path().to_path_buf()],
        virtual_env: None,
        python: tmp.path().join("no-such-python3").into_os_string(),
    }
}

/// A fake wheel layout: the search only looks at file names, so empty files stand in for it.
fn fake_venv(root: &Path, python: &str) -> PathBuf {
    let capi = root.join(format!(".venv/lib/{python}/site-packages/onnxruntime/capi"));
    fs::create_dir_all(&capi).unwrap();
    fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
    let lib = capi.join("libonnxruntime.so.1.32.0");
    fs::write(&lib, b"").unwrap();
    lib
}

#[test]
fn missing_runtime_library_lists_what_was_tried() {
    let tmp = tempfile::tempdir().unwrap();
    // A .venv without onnxruntime is reported by name; a start with no .venv above it says so.
    fs::create_dir_all(tmp.path().join("a/.venv/lib/python3.11/site-packages")).unwrap();
    fs::create_dir_all(tmp.path().join("b")).unwrap();
    let mut search = empty_search(&tmp);
    search.venv_search_starts = vec![tmp.path().join("a"), tmp.path().join("b")];
    search.virtual_env = Some(tmp.path().join("activated-venv"));
    let error = search.find().unwrap_err();
    assert!(matches!(error, RuntimeError::LibraryNotFound { .. }));
    insta::assert_snapshot!("missing_runtime_library", message(error, Some(&tmp)));
}

#[test]
fn ort_dylib_path_that_does_not_exist_is_an_error_not_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    fake_venv(tmp.path(), "python3.11");
    let mut search = empty_search(&tmp);
    search.ort_dylib_path = Some(tmp.path().join("nope/libonnxruntime.so").into_os_string());
    let error = search.find().unwrap_err();
    insta::assert_snapshot!("ort_dylib_path_missing", message(error, Some(&tmp)));
}

#[test]
fn discovery_order_and_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let nested = project.join("experiments/sub");
    fs::create_dir_all(&nested).unwrap();
    let venv_lib = fake_venv(&project, "python3.11");

    // Walking up from a subdirectory finds the project's .venv, not the provider library beside it.
    let mut search = empty_search(&tmp);
    search.venv_search_starts = vec![nested.clone()];
    assert_eq!(search.find().unwrap(), venv_lib);

    // The second start (the executable's directory) is searched when the first finds nothing.
    search.venv_search_starts = vec![tmp.path().join("elsewhere"), nested.clone()];
    fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
    assert_eq!(search.find().unwrap(), venv_lib);

    // ORT_DYLIB_PATH wins over the .venv; an empty value counts as unset.
    let explicit = tmp.path().join("custom/libonnxruntime.so");
    fs::create_dir_all(explicit.parent().unwrap()).unwrap();
    fs::write(&explicit, b"").unwrap();
    search.ort_dylib_path = Some(explicit.clone().into_os_string());
    assert_eq!(search.find().unwrap(), explicit);
    search.ort_dylib_path = Some(OsString::new());
    assert_eq!(search.find().unwrap(), venv_lib);

    // VIRTUAL_ENV is searched after the project .venv.
    let activated = tmp.path().join("activated");
    let activated_lib = fake_venv(&activated, "python3.12");
    let mut search = empty_search(&tmp);
    search.virtual_env = Some(activated.join(".venv"));
    assert_eq!(search.find().unwrap(), activated_lib);
}

#[test]
fn discovery_asks_the_active_python_last() {
    let tmp = tempfile::tempdir().unwrap();
    let package = tmp.path().join("site-packages/onnxruntime");
    fs::create_dir_all(package.join("capi")).unwrap();
    let lib = package.join("capi/libonnxruntime.so.1.32.0");
    fs::write(&lib, b"").unwrap();
    // A stand-in interpreter that answers like `python3 -c <find onnxruntime>` does.
    let python = tmp.path().join("fake-python3");
    fs::write(
        &python,
        format!("#!/bin/sh\necho '{}'\n", package.display()),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&python, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut search = empty_search(&tmp);
    search.python = python.clone().into_os_string();
    assert_eq!(search.find().unwrap(), lib);

    // An interpreter without onnxruntime prints an empty line.
    fs::write(&python, "#!/bin/sh\necho ''\n").unwrap();
    let error = search.find().unwrap_err();
    let text = message(error, Some(&tmp));
    assert!(
        text.contains("[TMP]/fake-python3: onnxruntime is not installed"),
        "{text}"
    );
}

#[test]
fn the_process_runtime_loads_and_offers_the_cpu_provider() {
    let runtime = runtime().unwrap();
    assert!(runtime.library().is_file());
    let providers = runtime.available_providers().unwrap();
    assert!(providers.iter().any(|p| p == CPU_PROVIDER), "{providers:?}");
}

// ---------------------------------------------------------------- providers

#[test]
fn provider_parsing() {
    assert_eq!("cpu".parse::<Provider>().unwrap(), Provider::Cpu);
    assert_eq!("cuda:1".parse::<Provider>().unwrap(), Provider::Cuda(1));
    assert_eq!("cuda".parse::<Provider>().unwrap(), Provider::Cuda(0));
    assert_eq!(
        "tensorrt:0".parse::<Provider>().unwrap(),
        Provider::TensorRt(0)
    );
    for provider in [Provider::Cpu, Provider::Cuda(3), Provider::TensorRt(2)] {
        assert_eq!(provider.to_string().parse::<Provider>().unwrap(), provider);
    }
    let errors: Vec<String> = ["gpu:0", "cuda:first", "cpu:0", "cuda:-1"]
        .iter()
        .map(|input| input.parse::<Provider>().unwrap_err().to_string())
        .collect();
    insta::assert_snapshot!("invalid_providers", errors.join("\n"));
}

#[test]
fn gpu_provider_without_gpu_runtime_is_an_error_not_a_cpu_run() {
    let runtime = runtime().unwrap();
    let providers = runtime.available_providers().unwrap();
    if providers.iter().any(|p| p == "CUDAExecutionProvider") {
        eprintln!("skipped: this ONNX Runtime has CUDA ({providers:?}); the CPU-wheel case cannot be checked");
        return;
    }
    let graph = fixture().join("unet/model.onnx");
    let library = runtime.library().display().to_string();
    let mut messages = Vec::new();
    for provider in [Provider::Cuda(0), Provider::TensorRt(0)] {
        let error = open_session(&graph, &SessionConfig::with_provider(provider)).unwrap_err();
        assert!(matches!(error, RuntimeError::ProviderUnavailable { .. }));
        messages.push(message(error, None).replace(&library, "[ORT_LIBRARY]"));
    }
    insta::assert_snapshot!("gpu_provider_unavailable", messages.join("\n"));
}

// ---------------------------------------------------------------- sessions

#[test]
fn corrupt_onnx_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.onnx");
    fs::write(&path, b"this is not a protobuf \xff\xff\xff\xff").unwrap();
    let error = open_session(&path, &cpu_single_thread()).unwrap_err();
    assert!(matches!(error, RuntimeError::SessionOpen { .. }));
    insta::assert_snapshot!("corrupt_onnx", message(error, Some(&tmp)));

    let error = open_session(&tmp.path().join("absent.onnx"), &cpu_single_thread()).unwrap_err();
    insta::assert_snapshot!("absent_onnx", message(error, Some(&tmp)));
}

// ---------------------------------------------------------------- model directories

#[test]
fn valid_model_dir_opens_and_runs_one_inference() {
    let dir = ModelDir::open(&fixture(), Some(Family::Sd)).unwrap();
    assert_eq!(dir.family(), Family::Sd);
    assert_eq!(dir.digest(), dir.manifest().digest.blake3);
    assert_eq!(dir.config_value::<i64>("sample_size").unwrap(), 8);
    assert_eq!(
        dir.config_value::<String>("scheduler.name").unwrap(),
        "pndm"
    );

    let mut unet = dir.session("unet", &cpu_single_thread()).unwrap();
    let x = Array2::from_shape_vec((2, 3), vec![1.0f32, -2.0, 0.5, 3.0, 0.25, -1.0]).unwrap();
    let w = Array2::from_shape_vec((3, 2), vec![0.5f32, -1.0, 2.0, 0.75, -0.25, 1.5]).unwrap();
    let b = Array1::from_vec(vec![0.125f32, -0.5]);
    let outputs = unet
        .run(ort::inputs![
            "x" => TensorRef::from_array_view(&x).unwrap(),
            "w" => TensorRef::from_array_view(&w).unwrap(),
            "b" => TensorRef::from_array_view(&b).unwrap(),
        ])
        .unwrap();
    let y = outputs["y"].try_extract_array::<f32>().unwrap();
    let y_argmax = outputs["y_argmax"].try_extract_array::<i64>().unwrap();

    let expected = x.dot(&w) + &b;
    assert_eq!(y.shape(), expected.shape());
    for (got, want) in y.iter().zip(expected.iter()) {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{y} vs {expected}"
        );
    }
    for (row, &index) in expected.rows().into_iter().zip(y_argmax.iter()) {
        let best = if row[1] > row[0] { 1 } else { 0 };
        assert_eq!(index, best, "argmax of {row}");
    }

    // The initializer `scale` is listed as a graph input in the ONNX file, yet neither the
    // manifest (common.onnx_io) nor ONNX Runtime counts it as an input.
    let mut text_encoder = dir.session("text_encoder", &cpu_single_thread()).unwrap();
    let ids = Array2::from_shape_vec((1, 4), vec![0i64, 7, 42, 49407]).unwrap();
    let outputs = text_encoder
        .run(ort::inputs!["input_ids" => TensorRef::from_array_view(&ids).unwrap()])
        .unwrap();
    let hidden = outputs["hidden"].try_extract_array::<f32>().unwrap();
    // runtime_fixtures.py fixes scale = 0.5.
    let expected: Vec<f32> = ids.iter().map(|&id| id as f32 * 0.5).collect();
    assert_eq!(hidden.iter().copied().collect::<Vec<_>>(), expected);
}

#[test]
fn model_dir_missing_a_graph_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    fs::remove_file(dir.join("unet/model.onnx")).unwrap();
    let error = ModelDir::open(&dir, Some(Family::Sd)).unwrap_err();
    assert!(matches!(error, RuntimeError::FileMissing { .. }));
    insta::assert_snapshot!("missing_unet", message(error, Some(&tmp)));
}

#[test]
fn model_dir_file_with_another_size() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    fs::write(dir.join("model_index.json"), b"{}\n").unwrap();
    let error = ModelDir::open(&dir, None).unwrap_err();
    insta::assert_snapshot!("size_mismatch", message(error, Some(&tmp)));
}

#[test]
fn model_dir_of_the_wrong_family() {
    let error = ModelDir::open(&fixture(), Some(Family::Blip2)).unwrap_err();
    insta::assert_snapshot!("wrong_family", message(error, None));
}

#[test]
fn directory_without_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let error = ModelDir::open(tmp.path(), Some(Family::Classifier)).unwrap_err();
    insta::assert_snapshot!("missing_manifest", message(error, Some(&tmp)));
    let error = ModelDir::open(tmp.path(), None).unwrap_err();
    insta::assert_snapshot!("missing_manifest_any_family", message(error, Some(&tmp)));
}

#[test]
fn manifest_of_an_unknown_format_version() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    edit_manifest(&dir, |m| {
        m.insert("format".into(), 2.into());
        // A future format may change anything else too; the version error must come first.
        m.remove("digest");
    });
    let error = ModelDir::open(&dir, None).unwrap_err();
    insta::assert_snapshot!("unknown_format", message(error, Some(&tmp)));
}

#[test]
fn manifest_that_is_not_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    edit_manifest(&dir, |m| {
        m.insert("family".into(), "gan".into());
    });
    let unknown_family = ModelDir::open(&dir, None).unwrap_err();

    let dir = tmp.path().join("toy-sd-2");
    copy_dir(&fixture(), &dir);
    edit_manifest(&dir, |m| {
        let files = m["files"].as_array_mut().unwrap();
        files[0]["blake3"] = "0".repeat(64).into();
    });
    let edited_list = ModelDir::open(&dir, None).unwrap_err();

    let dir = tmp.path().join("toy-sd-3");
    copy_dir(&fixture(), &dir);
    edit_manifest(&dir, |m| {
        m["graphs"]["unet"]["path"] = "../unet/model.onnx".into();
    });
    let escaping_path = ModelDir::open(&dir, None).unwrap_err();

    let text = [unknown_family, edited_list, escaping_path]
        .into_iter()
        .map(|e| message(e, Some(&tmp)))
        .collect::<Vec<_>>()
        .join("\n---\n");
    insta::assert_snapshot!("invalid_manifests", text);
}

#[test]
fn graph_whose_inputs_differ_from_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    edit_manifest(&dir, |m| {
        graph_tensors(m, "unet", "inputs")[0]["name"] = "sample".into();
        graph_tensors(m, "unet", "outputs")[1]["dtype"] = "int32".into();
    });
    // The files are untouched, so the directory opens; the graph does not.
    let model_dir = ModelDir::open(&dir, Some(Family::Sd)).unwrap();
    let error = model_dir.session("unet", &cpu_single_thread()).unwrap_err();
    assert!(matches!(error, RuntimeError::GraphIoMismatch { .. }));
    insta::assert_snapshot!("graph_io_mismatch", message(error, Some(&tmp)));

    let error = model_dir
        .session("vae_decoder", &cpu_single_thread())
        .unwrap_err();
    insta::assert_snapshot!("unknown_graph", message(error, Some(&tmp)));
}

#[test]
fn corrupt_graph_in_a_model_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    let graph = dir.join("unet/model.onnx");
    // Same size, other bytes: only opening the graph or rehashing can notice.
    let size = fs::metadata(&graph).unwrap().len() as usize;
    fs::write(&graph, vec![0xA5u8; size]).unwrap();
    let model_dir = ModelDir::open(&dir, Some(Family::Sd)).unwrap();
    let error = model_dir.session("unet", &cpu_single_thread()).unwrap_err();
    assert!(matches!(error, RuntimeError::SessionOpen { .. }));
    insta::assert_snapshot!("corrupt_graph_in_dir", message(error, Some(&tmp)));

    let error = model_dir.verify_deep().unwrap_err();
    insta::assert_snapshot!("deep_check_corrupt_graph", message(error, Some(&tmp)));
}

#[test]
fn deep_check_reports_unlisted_and_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    let model_dir = ModelDir::open(&dir, None).unwrap();
    fs::write(dir.join("unet/notes.txt"), b"added after export\n").unwrap();
    fs::remove_file(dir.join("model_index.json")).unwrap();
    let error = model_dir.verify_deep().unwrap_err();
    insta::assert_snapshot!("deep_check_unlisted_missing", message(error, Some(&tmp)));
}

#[test]
fn deep_check_recomputes_the_recorded_digest() {
    let model_dir = ModelDir::open(&fixture(), None).unwrap();
    let check = model_dir.verify_deep().unwrap();
    assert_eq!(check.files, 3);
    let listed: u64 = model_dir.manifest().files.iter().map(|f| f.size).sum();
    assert_eq!(check.bytes, listed);
}

#[test]
fn config_value_errors_name_the_key() {
    let model_dir = ModelDir::open(&fixture(), None).unwrap();
    let missing = model_dir
        .config_value::<i64>("latent_channels")
        .unwrap_err();
    let wrong_type = model_dir.config_value::<i64>("scheduler.name").unwrap_err();
    let text = [missing, wrong_type]
        .into_iter()
        .map(|e| message(e, None))
        .collect::<Vec<_>>()
        .join("\n");
    insta::assert_snapshot!("config_value_errors", text);
}

// ---------------------------------------------------------------- cip models check

#[test]
fn models_check_report() {
    let report = check_model_dir(&fixture(), false).unwrap();
    insta::assert_snapshot!(
        "models_check",
        report
            .to_string()
            .replace(&fixture().display().to_string(), "[FIXTURE]")
    );
    let deep = check_model_dir(&fixture(), true).unwrap();
    insta::assert_snapshot!(
        "models_check_deep",
        deep.to_string()
            .replace(&fixture().display().to_string(), "[FIXTURE]")
    );
}

#[test]
fn models_check_fails_on_a_graph_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_copy(&tmp);
    edit_manifest(&dir, |m| {
        graph_tensors(m, "text_encoder", "inputs").push(toml::Value::Table(
            toml::toml! { name = "attention_mask"
            dtype = "int64"
            shape = ["batch", "sequence"] },
        ));
    });
    let error = check_model_dir(&dir, false).unwrap_err();
    insta::assert_snapshot!("models_check_mismatch", message(error, Some(&tmp)));
}
