//! `cip data`: the demo set (determinism, idempotence), ImageNet subsets by links (and their
//! errors), ImageNette fetching against a local HTTP server (checksum pass, corrupt archive,
//! resume after a dropped connection), dataset checks, and the committed class files against the
//! facts of the paper's class sets.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Parser;

use cip::data::check;
use cip::data::cli::{self, DataCommand};
use cip::data::demo::{self, DemoOptions};
use cip::data::fetch::{self, FetchOptions, ImagenetteSize};
use cip::data::subset::{self, LinkKind, SubsetOptions};
use cip::data::{imagefolder, ClassNames, CsvTable, DataError, IMAGENETTE_CLASSES};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir` (links followed) with its bytes and mtime, by relative path.
fn files(dir: &Path) -> BTreeMap<String, (Vec<u8>, SystemTime)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, SystemTime)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
                out.insert(rel, (std::fs::read(&p).unwrap(), mtime));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn set_old_mtimes(dir: &Path) {
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for rel in files(dir).keys() {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(rel))
            .unwrap();
        f.set_modified(old).unwrap();
    }
}

/// An error message with the temp folder (and other run-specific strings) replaced.
fn redact(message: &str, pairs: &[(&str, &str)]) -> String {
    let mut m = message.to_string();
    for (from, to) in pairs {
        m = m.replace(from, to);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// demo

fn demo_opts(out: &Path, seed: u64) -> DemoOptions {
    DemoOptions {
        out: out.to_path_buf(),
        seed,
        ..DemoOptions::default()
    }
}

#[test]
fn demo_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let s = demo::draw(&demo_opts(&a, 5)).unwrap();
    demo::draw(&demo_opts(&b, 5)).unwrap();
    demo::draw(&demo_opts(&c, 6)).unwrap();
    assert_eq!(s.images, 4 * (6 + 4));
    assert_eq!(s.written, s.images + 1, "every image and classes.csv");
    let bytes = |d: &Path| {
        files(d)
            .into_iter()
            .map(|(k, (v, _))| (k, v))
            .collect::<Vec<_>>()
    };
    assert_eq!(bytes(&a), bytes(&b), "same seed, byte-identical files");
    let (fa, fc) = (bytes(&a), bytes(&c));
    let same_images = fa
        .iter()
        .zip(&fc)
        .filter(|(x, y)| x.0.ends_with(".png") && x == y)
        .count();
    assert_eq!(same_images, 0, "another seed draws other pictures");

    // ImageFolder layout, sizes, and the class file names the first N ImageNette classes.
    for (split, per_class) in [("train", 6), ("val", 4)] {
        let items = imagefolder::scan(&a.join(split)).unwrap();
        assert_eq!(items.len(), 4 * per_class);
        for item in &items {
            let img = image::open(a.join(split).join(&item.path)).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
        }
    }
    let classes = ClassNames::read(&a.join("classes.csv")).unwrap();
    let expected: Vec<&str> = IMAGENETTE_CLASSES[..4].iter().map(|c| c.0).collect();
    assert_eq!(classes.ids, expected);
    assert_eq!(classes.name("n01440764"), "tench");

    // The drawn set passes `cip data check`.
    let report = check::check(&a, Some(&classes)).unwrap();
    assert!(report.problems.is_empty(), "{report}");
}

#[test]
fn demo_rerun_leaves_identical_files_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    demo::draw(&demo_opts(&out, 1)).unwrap();
    set_old_mtimes(&out);
    let before = files(&out);
    let again = demo::draw(&demo_opts(&out, 1)).unwrap();
    assert_eq!((again.written, again.removed), (0, 0));
    assert_eq!(again.unchanged, before.len());
    assert_eq!(files(&out), before, "bytes and mtimes unchanged");

    // A changed image is rewritten; a smaller draw removes its stale pictures.
    let victim = out.join("train/n01440764/train_0002.png");
    std::fs::write(&victim, b"scribbled over").unwrap();
    let smaller = DemoOptions {
        train_per_class: 3,
        ..demo_opts(&out, 1)
    };
    let s = demo::draw(&smaller).unwrap();
    assert_eq!(s.written, 1, "only the scribbled file");
    assert_eq!(s.removed, 4 * 3, "train_0003..0005 of each class");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        before["train/n01440764/train_0002.png"].0
    );
    assert_eq!(imagefolder::scan(&out.join("train")).unwrap().len(), 4 * 3);
}

#[test]
fn demo_rejects_out_of_range_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let too_many = DemoOptions {
        classes: 11,
        ..demo_opts(tmp.path(), 0)
    };
    insta::assert_snapshot!(
        "demo_too_many_classes",
        demo::draw(&too_many).unwrap_err().to_string()
    );
    let tiny = DemoOptions {
        size: 4,
        ..demo_opts(tmp.path(), 0)
    };
    insta::assert_snapshot!(
        "demo_size_too_small",
        demo::draw(&tiny).unwrap_err().to_string()
    );
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "nothing written"
    );
}

// ---------------------------------------------------------------------------------------------
// subset

fn tiny_jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 6, |x, y| {
        image::Rgb([seed, (x * 30) as u8, (y * 40) as u8])
    });
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
        .encode_image(&img)
        .unwrap();
    buf
}

/// A fake ImageNet-1K tree: every ImageNette class plus two others, 3 train and 2 val images each,
/// named as in ILSVRC2012.
fn fake_imagenet(root: &Path) -> Vec<String> {
    let mut wnids: Vec<String> = IMAGENETTE_CLASSES.iter().map(|c| c.0.to_string()).collect();
    wnids.extend(["n01443537".to_string(), "n01484850".to_string()]);
    let mut val_index = 1;
    for (c, wnid) in wnids.iter().enumerate() {
        for k in 0..3 {
            let p = root
                .join("train")
                .join(wnid)
                .join(format!("{wnid}_{}.JPEG", 100 + k));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, tiny_jpeg(c as u8 * 10 + k)).unwrap();
        }
        for _ in 0..2 {
            let p = root
                .join("val")
                .join(wnid)
                .join(format!("ILSVRC2012_val_{val_index:08}.JPEG"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, tiny_jpeg(200 + val_index as u8)).unwrap();
            val_index += 1;
        }
    }
    wnids
}

fn subset_opts(root: &Path, out: &Path) -> SubsetOptions {
    SubsetOptions {
        imagenet: root.to_path_buf(),
        classes: repo().join("experiments/classes/imagenette.csv"),
        out: out.to_path_buf(),
        link: LinkKind::Symlink,
        splits: vec!["train".into(), "val".into()],
        val_labels: None,
    }
}

#[test]
fn subset_links_the_classes_and_writes_manifests() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("imagenet"), tmp.path().join("imagenette"));
    fake_imagenet(&root);
    let summaries = subset::subset(&subset_opts(&root, &out)).unwrap();
    let counts: Vec<(String, usize, usize, usize)> = summaries
        .iter()
        .map(|s| (s.split.clone(), s.classes, s.images, s.linked))
        .collect();
    assert_eq!(
        counts,
        vec![("train".into(), 10, 30, 30), ("val".into(), 10, 20, 20)]
    );

    // Links, not copies, to the absolute source; only the class file's classes.
    let link = out.join("train/n02102040/n02102040_101.JPEG");
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink());
    let target = std::fs::read_link(&link).unwrap();
    assert!(target.is_absolute());
    assert_eq!(
        target,
        root.canonicalize()
            .unwrap()
            .join("train/n02102040/n02102040_101.JPEG")
    );
    assert!(!out.join("train/n01443537").exists());

    let manifest = CsvTable::read(&out.join("val/manifest.csv")).unwrap();
    assert_eq!(manifest.headers, ["id", "path", "class"]);
    assert_eq!(manifest.rows.len(), 20);
    let first = &manifest.rows[0];
    assert_eq!(
        (&first[0], &first[1], &first[2]),
        (
            "n01440764/ILSVRC2012_val_00000001",
            "n01440764/ILSVRC2012_val_00000001.JPEG",
            "n01440764"
        )
    );
    // The manifest agrees with what an ImageFolder scan of the output sees.
    let scanned = imagefolder::scan(&out.join("val")).unwrap();
    let ids: Vec<&str> = manifest.rows.iter().map(|r| r.get(0).unwrap()).collect();
    assert_eq!(
        ids,
        scanned.iter().map(|i| i.id.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(out.join("classes.csv")).unwrap(),
        std::fs::read(repo().join("experiments/classes/imagenette.csv")).unwrap()
    );
    let report = check::check(&out, None).unwrap();
    assert!(report.problems.is_empty(), "{report}");

    // A rerun relinks nothing and rewrites no manifest.
    let manifest_mtime = |split: &str| {
        std::fs::metadata(out.join(split).join("manifest.csv"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = (manifest_mtime("train"), manifest_mtime("val"));
    std::thread::sleep(Duration::from_millis(20));
    let again = subset::subset(&subset_opts(&root, &out)).unwrap();
    assert!(again.iter().all(|s| s.linked == 0 && s.removed == 0));
    assert_eq!((manifest_mtime("train"), manifest_mtime("val")), before);

    // A smaller class file drops the other classes' links and notes the folders it leaves.
    let two = tmp.path().join("two.csv");
    std::fs::write(
        &two,
        "# two classes\nid,name\nn01440764,tench\nn03888257,parachute\n",
    )
    .unwrap();
    let smaller = SubsetOptions {
        classes: two,
        splits: vec!["train".into()],
        ..subset_opts(&root, &out)
    };
    let s = &subset::subset(&smaller).unwrap()[0];
    assert_eq!((s.images, s.linked, s.unchanged), (6, 0, 6));
    assert_eq!(s.foreign.len(), 8);
}

#[test]
fn subset_hardlinks_share_the_source_inode() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("imagenet"), tmp.path().join("out"));
    fake_imagenet(&root);
    let opts = SubsetOptions {
        link: LinkKind::Hardlink,
        ..subset_opts(&root, &out)
    };
    subset::subset(&opts).unwrap();
    let rel = "val/n03888257/ILSVRC2012_val_00000019.JPEG";
    let (a, b) = (
        std::fs::symlink_metadata(out.join(rel)).unwrap(),
        std::fs::metadata(root.join(rel)).unwrap(),
    );
    assert!(a.file_type().is_file());
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    let again = subset::subset(&opts).unwrap();
    assert!(again.iter().all(|s| s.linked == 0));
}

#[test]
fn subset_sorts_a_flat_val_folder_with_kaggle_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("imagenet"), tmp.path().join("out"));
    let wnids = fake_imagenet(&root);
    // Flatten val as ILSVRC2012 ships it, and write LOC_val_solution.csv for it.
    let mut labels = String::from("ImageId,PredictionString\n");
    for wnid in &wnids {
        let dir = root.join("val").join(wnid);
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            std::fs::rename(e.path(), root.join("val").join(&name)).unwrap();
            let stem = name.trim_end_matches(".JPEG");
            labels.push_str(&format!("{stem},{wnid} 1 2 30 40 {wnid} 5 6 70 80 \n"));
        }
        std::fs::remove_dir(dir).unwrap();
    }
    let labels_path = tmp.path().join("LOC_val_solution.csv");
    std::fs::write(&labels_path, labels).unwrap();

    let err = subset::subset(&subset_opts(&root, &out)).unwrap_err();
    assert!(matches!(err, DataError::FlatSplit { images: 24, .. }));
    assert!(
        !out.exists(),
        "nothing linked before every split checks out"
    );

    let opts = SubsetOptions {
        val_labels: Some(labels_path),
        ..subset_opts(&root, &out)
    };
    let summaries = subset::subset(&opts).unwrap();
    assert_eq!(summaries[1].images, 20);
    assert_eq!(
        (summaries[1].min_per_class, summaries[1].max_per_class),
        (2, 2)
    );
    let target =
        std::fs::read_link(out.join("val/n03000684/ILSVRC2012_val_00000007.JPEG")).unwrap();
    assert_eq!(
        target,
        root.canonicalize()
            .unwrap()
            .join("val/ILSVRC2012_val_00000007.JPEG")
    );
}

#[test]
fn subset_errors_name_the_problem_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, out) = (tmp.path().join("imagenet"), tmp.path().join("out"));
    fake_imagenet(&root);
    let t = tmp.path().display().to_string();
    let redacted = |e: DataError| redact(&e.to_string(), &[(&t, "[TMP]")]);
    let classes_dir = repo().join("experiments/classes").display().to_string();

    let missing_root = SubsetOptions {
        imagenet: tmp.path().join("nowhere"),
        ..subset_opts(&root, &out)
    };
    insta::assert_snapshot!(
        "subset_missing_root",
        redacted(subset::subset(&missing_root).unwrap_err())
    );

    let missing_split = SubsetOptions {
        splits: vec!["train".into(), "test".into()],
        ..subset_opts(&root, &out)
    };
    insta::assert_snapshot!(
        "subset_missing_split",
        redacted(subset::subset(&missing_split).unwrap_err())
    );

    // A class file naming classes this tree does not have.
    let mixed = tmp.path().join("mixed.csv");
    std::fs::write(
        &mixed,
        "index,id,name\n0,n01440764,tench\n10,n01530575,brambling\n11,n01531178,goldfinch\n",
    )
    .unwrap();
    let absent = SubsetOptions {
        classes: mixed,
        ..subset_opts(&root, &out)
    };
    insta::assert_snapshot!(
        "subset_missing_classes",
        redacted(subset::subset(&absent).unwrap_err())
    );
    // ImageNet-100 on this 12-class tree: a long list stays one line.
    let imagenet100 = SubsetOptions {
        classes: repo().join("experiments/classes/imagenet100.csv"),
        ..subset_opts(&root, &out)
    };
    let message = redact(
        &subset::subset(&imagenet100).unwrap_err().to_string(),
        &[(&t, "[TMP]"), (&classes_dir, "[CLASSES]")],
    );
    insta::assert_snapshot!("subset_missing_imagenet100", message);

    let flat = tmp.path().join("flat");
    for (wnid, _) in IMAGENETTE_CLASSES {
        std::fs::create_dir_all(flat.join("train").join(wnid)).unwrap();
    }
    std::fs::create_dir_all(flat.join("val")).unwrap();
    for i in 1..=3 {
        std::fs::write(
            flat.join(format!("val/ILSVRC2012_val_{i:08}.JPEG")),
            tiny_jpeg(1),
        )
        .unwrap();
    }
    let flat_val = SubsetOptions {
        imagenet: flat,
        ..subset_opts(&root, &out)
    };
    insta::assert_snapshot!(
        "subset_flat_val",
        redacted(subset::subset(&flat_val).unwrap_err())
    );
    assert!(!out.exists(), "failed runs link nothing");
}

// ---------------------------------------------------------------------------------------------
// fetch

/// A one-archive HTTP/1.1 server on 127.0.0.1 that honours `Range: bytes=N-`. It can drop the
/// connection after some body bytes of its first response, and records each request's Range.
struct Server {
    base: String,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

fn serve(path: &'static str, body: Vec<u8>, drop_first_after: Option<usize>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().to_string());
                    }
                }
            }
            seen.lock().unwrap().push(range.clone());
            let len = body.len();
            let requested = request_line.split_whitespace().nth(1).unwrap_or("");
            if requested != path {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let start: usize = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .unwrap_or(0);
            let head = if start >= len && range.is_some() {
                format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            } else if range.is_some() {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    len - 1,
                    len - start
                )
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            };
            stream.write_all(head.as_bytes()).unwrap();
            if start < len {
                let mut slice = &body[start..];
                if n == 0 {
                    if let Some(cut) = drop_first_after {
                        slice = &slice[..cut];
                    }
                }
                let _ = stream.write_all(slice);
            }
            let _ = stream.flush();
            // Dropping the stream closes the connection, mid-body for a cut response.
        }
    });
    Server { base, ranges }
}

/// A small imagenette2-320.tgz: the real archive's layout with a few tiny JPEGs.
fn imagenette_tgz() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_575_000_000);
        header.set_cksum();
        tar.append_data(&mut header, path, data).unwrap();
    };
    for (c, (wnid, _)) in IMAGENETTE_CLASSES.iter().enumerate().take(3) {
        for k in 0..2 {
            add(
                &format!("imagenette2-320/train/{wnid}/{wnid}_{k}.JPEG"),
                &tiny_jpeg(c as u8 + k),
            );
        }
        add(
            &format!("imagenette2-320/val/{wnid}/ILSVRC2012_val_{c:08}.JPEG"),
            &tiny_jpeg(100 + c as u8),
        );
    }
    add(
        "imagenette2-320/noisy_imagenette.csv",
        b"path,noisy_labels_0\n",
    );
    tar.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn fetch_opts(server: &Server, out: &Path, sha: Option<String>) -> FetchOptions {
    FetchOptions {
        out: out.to_path_buf(),
        url_base: server.base.clone(),
        sha256: sha,
        ..FetchOptions::new(ImagenetteSize::Px320)
    }
}

#[test]
fn fetch_verifies_and_unpacks_then_does_nothing_on_rerun() {
    let archive = imagenette_tgz();
    let digest = sha256(&archive);
    let server = serve("/imagenette2-320.tgz", archive.clone(), None);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imagenette2-320");
    let s = fetch::fetch(&fetch_opts(&server, &out, Some(digest.to_uppercase()))).unwrap();
    assert_eq!(s.sha256, digest);
    assert_eq!((s.resumed_from, s.downloaded), (0, archive.len() as u64));
    assert_eq!((s.train_images, s.val_images), (6, 3));
    assert!(out.join("noisy_imagenette.csv").is_file());
    assert!(
        !out.join("imagenette2-320.tgz").exists(),
        "archive removed after unpacking"
    );
    assert!(!out.join("imagenette2-320.tgz.part").exists());
    let classes = ClassNames::read(&out.join("classes.csv")).unwrap();
    assert_eq!(classes.ids.len(), 10);
    let report = check::check(&out, None).unwrap();
    assert!(report.problems.is_empty(), "{report}");
    let text = cli::render_fetch(&s);
    assert!(text.contains("9,469 train / 3,925 val"), "{text}");

    let before = files(&out);
    let again = fetch::fetch(&fetch_opts(&server, &out, Some(digest))).unwrap();
    assert!(again.already_done);
    assert_eq!(server.ranges.lock().unwrap().len(), 1, "no second request");
    assert_eq!(files(&out), before);
}

#[test]
fn fetch_refuses_a_corrupt_archive() {
    let archive = imagenette_tgz();
    let digest = sha256(&archive);
    let mut corrupt = archive.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0x55;
    let bad_digest = sha256(&corrupt);
    let server = serve("/imagenette2-320.tgz", corrupt, None);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imagenette2-320");
    let err = fetch::fetch(&fetch_opts(&server, &out, Some(digest.clone()))).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }));
    let t = tmp.path().display().to_string();
    insta::assert_snapshot!(
        "fetch_checksum_mismatch",
        redact(
            &err.to_string(),
            &[
                (&t, "[TMP]"),
                (&digest, "[EXPECTED]"),
                (&bad_digest, "[ACTUAL]")
            ]
        )
    );
    assert!(
        !out.join("train").exists() && !out.join("val").exists(),
        "nothing unpacked"
    );
    assert!(
        !out.join("imagenette2-320.tgz.part").exists(),
        "bad download removed"
    );
    assert!(!out.join(".cip-fetch").exists());

    // Without --sha256 the published digests of the real archive apply, and the error says where
    // they come from.
    let err = fetch::fetch(&fetch_opts(&server, &out, None)).unwrap_err();
    insta::assert_snapshot!(
        "fetch_checksum_mismatch_published",
        redact(
            &err.to_string(),
            &[(&t, "[TMP]"), (&bad_digest, "[ACTUAL]")]
        )
    );
    let bad = FetchOptions {
        sha256: Some("abc".into()),
        ..fetch_opts(&server, &out, None)
    };
    insta::assert_snapshot!(
        "fetch_bad_sha256_argument",
        fetch::fetch(&bad).unwrap_err().to_string()
    );
}

#[test]
fn fetch_resumes_an_interrupted_download() {
    let archive = imagenette_tgz();
    let digest = sha256(&archive);
    let cut = archive.len() / 3;
    let server = serve("/imagenette2-320.tgz", archive.clone(), Some(cut));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imagenette2-320");
    let opts = fetch_opts(&server, &out, Some(digest.clone()));

    let err = fetch::fetch(&opts).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "interrupted after {cut} of {} bytes",
            archive.len()
        )),
        "{message}"
    );
    assert!(
        message.contains("rerun the same command to resume"),
        "{message}"
    );
    let part = out.join("imagenette2-320.tgz.part");
    assert_eq!(std::fs::read(&part).unwrap(), archive[..cut]);
    assert!(!out.join("train").exists());

    let s = fetch::fetch(&opts).unwrap();
    assert_eq!(
        *server.ranges.lock().unwrap(),
        vec![None, Some(format!("bytes={cut}-"))]
    );
    assert_eq!(
        (s.resumed_from, s.downloaded),
        (cut as u64, (archive.len() - cut) as u64)
    );
    assert_eq!(s.sha256, digest);
    assert_eq!((s.train_images, s.val_images), (6, 3));
}

#[test]
fn fetch_reports_a_missing_archive() {
    let server = serve("/elsewhere.tgz", vec![1, 2, 3], None);
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch::fetch(&fetch_opts(&server, tmp.path(), None)).unwrap_err();
    let message = redact(&err.to_string(), &[(&server.base, "http://[SERVER]/")]);
    insta::assert_snapshot!("fetch_not_found", message);
}

// ---------------------------------------------------------------------------------------------
// check

#[test]
fn check_reports_corrupt_files_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    demo::draw(&demo_opts(&out, 2)).unwrap();
    let png = out.join("train/n02102040/train_0001.png");
    let bytes = std::fs::read(&png).unwrap();
    std::fs::write(&png, &bytes[..bytes.len() / 2]).unwrap(); // truncated
    std::fs::write(out.join("val/n01440764/val_0000.png"), b"not an image").unwrap();
    std::os::unix::fs::symlink(
        tmp.path().join("moved-away.JPEG"),
        out.join("val/n02979186/broken.JPEG"),
    )
    .unwrap();
    std::fs::create_dir_all(out.join("val/n09999999")).unwrap();

    let report = check::check(&out, None).unwrap();
    let problems: Vec<String> = report
        .problems
        .iter()
        .map(|p| p.path.strip_prefix(&out).unwrap().display().to_string())
        .collect();
    assert_eq!(
        problems,
        vec![
            "train/n02102040/train_0001.png",
            "val/n01440764/val_0000.png",
            "val/n02979186/broken.JPEG",
            "val/n09999999",
            "train",
        ]
    );
    let t = tmp.path().display().to_string();
    insta::assert_snapshot!(
        "check_report",
        redact(&report.to_string(), &[(&t, "[TMP]")])
    );

    // Through the CLI entry point: the report is printed and the command fails.
    let err = cli::run(DataCommand::Check {
        dir: out.clone(),
        classes: None,
    })
    .unwrap_err();
    assert!(
        matches!(err, DataError::CheckFailed { problems: 5, .. }),
        "{err}"
    );
}

#[test]
fn check_accepts_a_single_split_and_a_class_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    demo::draw(&demo_opts(&out, 3)).unwrap();
    let report = check::check(&out.join("val"), None).unwrap();
    assert_eq!(report.splits.len(), 1);
    assert_eq!(report.splits[0].images, 16);
    assert_eq!(report.splits[0].width, Some((32, 32)));
    assert!(report.problems.is_empty());
    // The demo has 4 of the 10 ImageNette classes.
    let all = ClassNames::read(&repo().join("experiments/classes/imagenette.csv")).unwrap();
    let report = check::check(&out, Some(&all)).unwrap();
    assert_eq!(report.problems.len(), 2, "{report}");
    for p in &report.problems {
        assert!(
            p.message.contains("n03028079") && !p.message.contains("n03000684"),
            "{report}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CLI surface

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: DataCommand,
}

#[test]
fn data_commands_parse_with_their_defaults() {
    let parse = |args: &[&str]| {
        let mut all = vec!["cip-data"];
        all.extend(args);
        Cli::try_parse_from(all).map(|c| c.cmd)
    };
    match parse(&["demo", "--out", "d"]).unwrap() {
        DataCommand::Demo {
            out,
            classes,
            train_per_class,
            val_per_class,
            size,
            seed,
        } => assert_eq!(
            (out, classes, train_per_class, val_per_class, size, seed),
            (PathBuf::from("d"), 4, 6, 4, 32, 0)
        ),
        _ => unreachable!(),
    }
    match parse(&["fetch", "imagenette", "--size", "160"]).unwrap() {
        DataCommand::Fetch {
            size,
            out,
            url_base,
            ..
        } => {
            assert_eq!(size, ImagenetteSize::Px160);
            assert_eq!(out, None);
            assert_eq!(url_base, fetch::DEFAULT_URL_BASE);
            assert_eq!(
                size.default_out(),
                PathBuf::from("experiments/data/imagenette2-160")
            );
        }
        _ => unreachable!(),
    }
    match parse(&[
        "subset",
        "--imagenet",
        "/in",
        "--classes",
        "c.csv",
        "--out",
        "o",
        "--splits",
        "val",
        "--link",
        "hardlink",
    ])
    .unwrap()
    {
        DataCommand::Subset { splits, link, .. } => {
            assert_eq!(splits, vec!["val".to_string()]);
            assert_eq!(link, LinkKind::Hardlink);
        }
        _ => unreachable!(),
    }
    match parse(&[
        "subset",
        "--imagenet",
        "/in",
        "--classes",
        "c.csv",
        "--out",
        "o",
    ])
    .unwrap()
    {
        DataCommand::Subset { splits, link, .. } => {
            assert_eq!(splits, vec!["train".to_string(), "val".to_string()]);
            assert_eq!(link, LinkKind::Symlink);
        }
        _ => unreachable!(),
    }
    assert!(parse(&["fetch", "imagenet"]).is_err());
    assert!(parse(&["fetch", "imagenette", "--size", "224"]).is_err());
}

// ---------------------------------------------------------------------------------------------
// class files

/// `index,id,name` rows of a committed class file.
fn class_file(name: &str) -> Vec<(usize, String, String)> {
    let path = repo().join("experiments/classes").join(name);
    let table = CsvTable::read(&path).unwrap();
    assert_eq!(table.headers, ["index", "id", "name"], "{name}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# ") && text.contains("generated by models/classes.py"),
        "{name}: the header names its source"
    );
    // Readable as a class file by the rest of cip.
    ClassNames::read(&path).unwrap();
    table
        .rows
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].to_string(), r[2].to_string()))
        .collect()
}

// The facts of ../shared/reference/classes.md.
const IMAGENETTE_INDICES: [usize; 10] = [0, 217, 482, 491, 497, 566, 569, 571, 574, 701];
const IMAGENETTE_IDS: &str = "n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 \
    n03417042 n03425413 n03445777 n03888257";
const IMAGENET100_INDICES: &str = "15 45 54 57 64 74 90 99 119 120 122 131 137 151 155 157 158 \
    166 167 169 176 180 209 211 222 228 234 236 242 246 267 268 272 275 277 281 299 305 313 317 \
    331 342 368 374 407 421 431 449 452 455 479 494 498 503 508 544 560 570 592 593 599 606 608 \
    619 620 653 659 662 665 667 674 682 703 708 717 724 748 758 765 766 772 775 796 798 830 854 \
    857 858 872 876 882 904 908 936 938 953 959 960 993 994";
const IMAGENET100_IDS: &str = "n01558993 n01692333 n01729322 n01735189 n01749939 n01773797 \
    n01820546 n01855672 n01978455 n01980166 n01983481 n02009229 n02018207 n02085620 n02086240 \
    n02086910 n02087046 n02089867 n02089973 n02090622 n02091831 n02093428 n02099849 n02100583 \
    n02104029 n02105505 n02106550 n02107142 n02108089 n02109047 n02113799 n02113978 n02114855 \
    n02116738 n02119022 n02123045 n02138441 n02172182 n02231487 n02259212 n02326432 n02396427 \
    n02483362 n02488291 n02701002 n02788148 n02804414 n02859443 n02869837 n02877765 n02974003 \
    n03017168 n03032252 n03062245 n03085013 n03259280 n03379051 n03424325 n03492542 n03494278 \
    n03530642 n03584829 n03594734 n03637318 n03642806 n03764736 n03775546 n03777754 n03785016 \
    n03787032 n03794056 n03837869 n03891251 n03903868 n03930630 n03947888 n04026417 n04067472 \
    n04099969 n04111531 n04127249 n04136333 n04229816 n04238763 n04336792 n04418357 n04429376 \
    n04435653 n04485082 n04493381 n04517823 n04589890 n04592741 n07714571 n07715103 n07753275 \
    n07831146 n07836838 n13037406 n13040303";

#[test]
fn imagenet1k_class_file_lists_the_clip_names_in_index_order() {
    let rows = class_file("imagenet1k.csv");
    assert_eq!(rows.len(), 1000);
    for (i, (index, id, name)) in rows.iter().enumerate() {
        assert_eq!(*index, i);
        assert!(
            id.len() == 9 && id.starts_with('n') && id[1..].bytes().all(|b| b.is_ascii_digit()),
            "{id}"
        );
        assert!(!name.is_empty() && name.trim() == name);
    }
    let ids: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ids.len(), 1000, "WordNet ids are unique");
    // WordNet ids in ImageNet index order are sorted (the classic ILSVRC order).
    assert!(rows.windows(2).all(|w| w[0].1 < w[1].1));
    for (index, name) in [
        (21, "kite (bird of prey)"),
        (134, "crane bird"),
        (348, "ram (adult male sheep)"),
        (0, "tench"),
    ] {
        assert_eq!(rows[index].2, name);
    }
}

#[test]
fn subset_class_files_match_the_paper_class_sets() {
    let all = class_file("imagenet1k.csv");
    let consistent = |name: &str, rows: &[(usize, String, String)]| {
        for (index, id, class) in rows {
            assert_eq!(&all[*index].1, id, "{name}: index {index}");
            assert_eq!(&all[*index].2, class, "{name}: name of {id}");
        }
        assert!(
            rows.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: index order"
        );
    };

    let nette = class_file("imagenette.csv");
    consistent("imagenette.csv", &nette);
    assert_eq!(
        nette.iter().map(|r| r.0).collect::<Vec<_>>(),
        IMAGENETTE_INDICES
    );
    assert_eq!(
        nette.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        IMAGENETTE_IDS.split_whitespace().collect::<Vec<_>>()
    );
    // The built-in table that `demo` and `fetch` write agrees with the committed file.
    let builtin: Vec<(String, String)> = IMAGENETTE_CLASSES
        .iter()
        .map(|(i, n)| (i.to_string(), n.to_string()))
        .collect();
    let committed: Vec<(String, String)> =
        nette.iter().map(|r| (r.1.clone(), r.2.clone())).collect();
    assert_eq!(builtin, committed);

    let hundred = class_file("imagenet100.csv");
    consistent("imagenet100.csv", &hundred);
    let indices: Vec<usize> = IMAGENET100_INDICES
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(hundred.iter().map(|r| r.0).collect::<Vec<_>>(), indices);
    assert_eq!(
        hundred.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        IMAGENET100_IDS.split_whitespace().collect::<Vec<_>>()
    );

    for name in ["imagenet-r.csv", "imagenet-a.csv"] {
        let rows = class_file(name);
        assert_eq!(rows.len(), 200, "{name}");
        consistent(name, &rows);
    }
    // The two 200-class masks are different subsets.
    assert_ne!(class_file("imagenet-r.csv"), class_file("imagenet-a.csv"));
}

#[test]
fn test_server_serves_the_whole_body() {
    // Guard for the test server itself: a plain GET gets the whole body.
    let server = serve("/x.tgz", b"hello".to_vec(), None);
    let addr = server
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /x.tgz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200 OK") && text.ends_with("hello"),
        "{text}"
    );
}
