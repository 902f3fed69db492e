//! `cip data fetch imagenette`: fast.ai's imagenette2 archives, SHA-256 verified, resumable,
//! unpacked into an ImageFolder (`OUT/train`, `OUT/val`) with `OUT/classes.csv`.
//!
//! The download goes to `OUT/<archive>.part`; a rerun after an interruption asks for the rest with
//! an HTTP Range request. Only an archive whose SHA-256 matches is unpacked: a mismatch deletes the
//! download (resuming onto bad bytes could never succeed). Unpacking goes through a staging folder,
//! and `OUT/.cip-fetch` marks a finished fetch, so a rerun of a finished fetch does nothing.
//!
//! imagenette2 uses fast.ai's split (9,469 train / 3,925 val images), not the paper's split (the
//! ImageNet-1K train and val images of the ten classes, 50 val images per class), which
//! `cip data subset` makes from a local ImageNet.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{io_err, write_if_changed, DataError, IMAGENETTE_CLASSES};

pub const DEFAULT_URL_BASE: &str = "https://s3.amazonaws.com/fast-ai-imageclas/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchDataset {
    /// fast.ai's ImageNette v2: the 10 ImageNette classes, fast.ai's train/val split.
    Imagenette,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImagenetteSize {
    /// Original images (imagenette2.tgz, about 1.5 GB).
    Full,
    /// Shortest side 320 px (imagenette2-320.tgz, about 340 MB): enough for 224 px crops.
    #[value(name = "320")]
    Px320,
    /// Shortest side 160 px (imagenette2-160.tgz, about 100 MB).
    #[value(name = "160")]
    Px160,
}

impl ImagenetteSize {
    /// The archive's file name, which is also its top-level folder plus `.tgz`.
    pub fn archive(self) -> &'static str {
        match self {
            ImagenetteSize::Full => "imagenette2.tgz",
            ImagenetteSize::Px320 => "imagenette2-320.tgz",
            ImagenetteSize::Px160 => "imagenette2-160.tgz",
        }
    }

    /// The default output folder: `experiments/data/<archive stem>`.
    pub fn default_out(self) -> PathBuf {
        PathBuf::from("experiments/data").join(self.archive().trim_end_matches(".tgz"))
    }
}

/// Published SHA-256 digests of fast.ai's archives, with where each was published.
///
/// These were copied from other projects' checksum tables, not computed here: this code was written
/// on a machine without internet access, and no download of the real archives was verified. fast.ai
/// has re-uploaded archives under the same names (the published tables disagree), so each archive
/// lists every digest found; any of them is accepted. A digest that matches none is refused; if
/// fast.ai re-uploaded again, check the archive another way and pass `--sha256`.
pub const PUBLISHED_SHA256: &[(&str, &str, &str)] = &[
    (
        "imagenette2.tgz",
        "6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
        "tensorflow/datasets, tensorflow_datasets/datasets/imagenette/checksums.tsv",
    ),
    (
        "imagenette2-320.tgz",
        "569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
        "tensorflow/datasets checksums.tsv; FluxML/FastAI.jl src/datasets/datadeps/imageclassification.jl",
    ),
    (
        "imagenette2-320.tgz",
        "5020a9130cea0348272823cb12d2db7e981c6f2afa3dce71ccd5b8013005c55e",
        "lorenzoh/VisionDatasets.jl src/classification/ImageNette.jl",
    ),
    (
        "imagenette2-160.tgz",
        "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
        "tensorflow/datasets, tensorflow_datasets/datasets/imagenette/checksums.tsv",
    ),
    (
        "imagenette2-160.tgz",
        "88daccb09b6fce93f45e6c09ddeb269cce705549e6bff322092a2a5a11489863",
        "FluxML/FastAI.jl imageclassification.jl; lorenzoh/VisionDatasets.jl ImageNette.jl",
    ),
];

pub const SPLIT_NOTE: &str = "imagenette2 uses fast.ai's split (9,469 train / 3,925 val images), \
not the paper's (the ImageNet-1K train/val images of these classes, 50 val per class): \
for the paper's split use `cip data subset --classes experiments/classes/imagenette.csv`";

const MARKER: &str = ".cip-fetch";

#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub dataset: FetchDataset,
    pub size: ImagenetteSize,
    pub out: PathBuf,
    pub url_base: String,
    /// Overrides the published digests.
    pub sha256: Option<String>,
    pub keep_archive: bool,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
}

impl FetchOptions {
    pub fn new(size: ImagenetteSize) -> FetchOptions {
        FetchOptions {
            dataset: FetchDataset::Imagenette,
            size,
            out: size.default_out(),
            url_base: DEFAULT_URL_BASE.to_string(),
            sha256: None,
            keep_archive: false,
            progress: false,
        }
    }

    pub fn url(&self) -> String {
        let base = self.url_base.trim_end_matches('/');
        format!("{base}/{}", self.size.archive())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchSummary {
    pub out: PathBuf,
    pub url: String,
    pub sha256: String,
    /// True when a finished fetch was found and nothing was done.
    pub already_done: bool,
    /// Bytes already on disk when the download (re)started; 0 for a fresh one.
    pub resumed_from: u64,
    /// Bytes received over the network in this run.
    pub downloaded: u64,
    pub train_images: usize,
    pub val_images: usize,
}

pub fn fetch(opts: &FetchOptions) -> Result<FetchSummary, DataError> {
    let FetchDataset::Imagenette = opts.dataset;
    let archive_name = opts.size.archive();
    let accepted = accepted_digests(opts)?;
    let url = opts.url();
    let out = &opts.out;
    let mut summary = FetchSummary {
        out: out.clone(),
        url: url.clone(),
        ..FetchSummary::default()
    };

    let marker = out.join(MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        let done = text
            .lines()
            .find_map(|l| l.strip_prefix("sha256="))
            .map(str::to_string);
        if let Some(digest) = done {
            if accepted.iter().any(|(d, _)| *d == digest)
                && out.join("train").is_dir()
                && out.join("val").is_dir()
            {
                summary.already_done = true;
                summary.sha256 = digest;
                count_images(&mut summary)?;
                return Ok(summary);
            }
        }
    }

    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let archive = out.join(archive_name);
    let part = out.join(format!("{archive_name}.part"));
    // A verified archive from an interrupted unpack is reused, and checked again on the way.
    if !archive.is_file() {
        let got = download(&url, &part, opts.progress)?;
        summary.resumed_from = got.resumed_from;
        summary.downloaded = got.downloaded;
    }
    let from = if archive.is_file() { &archive } else { &part };
    let digest = sha256_file(from)?;
    if !accepted.iter().any(|(d, _)| *d == digest) {
        std::fs::remove_file(from).map_err(io_err(from))?;
        let expected = accepted
            .iter()
            .map(|(d, _)| d.as_str())
            .collect::<Vec<_>>()
            .join(" or ");
        let help = if opts.sha256.is_some() {
            "Rerun to download it again.".to_string()
        } else {
            format!(
                "Rerun to download it again; if fast.ai has re-uploaded {archive_name}, check it another way and pass --sha256 (the expected digests were published by: {}).",
                accepted.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join("; ")
            )
        };
        return Err(DataError::Checksum {
            path: from.clone(),
            actual: digest,
            expected,
            help,
        });
    }
    if from == &part {
        std::fs::rename(&part, &archive).map_err(io_err(&archive))?;
    }
    summary.sha256 = digest.clone();

    unpack_tgz(&archive, out)?;
    let mut classes = String::from(
        "# fast.ai imagenette2 classes; names: their CLIP-style ImageNet prompt names\nid,name\n",
    );
    for (id, name) in IMAGENETTE_CLASSES {
        classes.push_str(&format!("{id},{name}\n"));
    }
    write_if_changed(&out.join("classes.csv"), classes.as_bytes())?;
    write_if_changed(&marker, format!("url={url}\nsha256={digest}\n").as_bytes())?;
    if !opts.keep_archive {
        std::fs::remove_file(&archive).map_err(io_err(&archive))?;
    }
    count_images(&mut summary)?;
    Ok(summary)
}

/// The digests a download may have, with their sources: `--sha256`, else the published ones.
fn accepted_digests(opts: &FetchOptions) -> Result<Vec<(String, String)>, DataError> {
    if let Some(given) = &opts.sha256 {
        let hex = given.trim().to_ascii_lowercase();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(DataError::Argument {
                arg: "--sha256".into(),
                message: format!("`{given}` is not a SHA-256 digest (64 hexadecimal digits)"),
            });
        }
        return Ok(vec![(hex, "--sha256".into())]);
    }
    Ok(PUBLISHED_SHA256
        .iter()
        .filter(|(name, _, _)| *name == opts.size.archive())
        .map(|(_, d, s)| (d.to_string(), s.to_string()))
        .collect())
}

fn count_images(summary: &mut FetchSummary) -> Result<(), DataError> {
    summary.train_images = super::imagefolder::scan(&summary.out.join("train"))?.len();
    summary.val_images = super::imagefolder::scan(&summary.out.join("val"))?.len();
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Downloaded {
    pub resumed_from: u64,
    pub downloaded: u64,
}

/// Downloads `url` into `part`, continuing a partial file with a Range request. On a dropped
/// connection the bytes received so far stay in `part` for the next call.
pub fn download(url: &str, part: &Path, progress: bool) -> Result<Downloaded, DataError> {
    let http = |message: String| DataError::Http {
        url: url.to_string(),
        message,
    };
    let agent = agent(url);
    let mut offset = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    // At most two requests: a server that cannot serve the range we hold gets one fresh start.
    for _attempt in 0..2 {
        let mut request = agent.get(url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        let response = request.call().map_err(|e| http(e.to_string()))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (start, total) = match status {
            200 => (0, header("content-length").and_then(|v| v.parse().ok())),
            206 => {
                let range = header("content-range").unwrap_or_default();
                match parse_content_range(&range) {
                    Some((start, total)) if start == offset => (start, total),
                    _ => {
                        return Err(http(format!(
                            "asked for bytes {offset}- and got Content-Range `{range}`"
                        )))
                    }
                }
            }
            416 if offset > 0 => {
                // `bytes */TOTAL`: an earlier run got everything but stopped before verifying.
                let complete = header("content-range")
                    .and_then(|r| r.trim().strip_prefix("bytes */")?.parse::<u64>().ok())
                    == Some(offset);
                if complete {
                    return Ok(Downloaded {
                        resumed_from: offset,
                        downloaded: 0,
                    });
                }
                // What we hold does not fit what the server has now: start over.
                std::fs::remove_file(part).map_err(io_err(part))?;
                offset = 0;
                continue;
            }
            _ => {
                return Err(http(format!(
                    "HTTP {status}{}",
                    if status == 404 {
                        ": no such archive here (check --url-base)"
                    } else {
                        ""
                    }
                )))
            }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(part)
            .map_err(io_err(part))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let bar = if progress {
            let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            bar.set_position(start);
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        let result: std::io::Result<()> = loop {
            match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = writer.write_all(&buf[..n]) {
                        return Err(io_err(part)(e));
                    }
                    received += n as u64;
                    bar.inc(n as u64);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            }
        };
        bar.finish_and_clear();
        writer.flush().map_err(io_err(part))?;
        writer.get_ref().sync_all().map_err(io_err(part))?;
        let have = start + received;
        let short = total.is_some_and(|t| have < t);
        if result.is_err() || short {
            let why = match result {
                Err(e) => e.to_string(),
                Ok(()) => "connection closed early".into(),
            };
            return Err(http(format!(
                "download interrupted after {have}{} bytes ({why}); {} keeps them: rerun the same command to resume",
                total.map(|t| format!(" of {t}")).unwrap_or_default(),
                part.display()
            )));
        }
        return Ok(Downloaded {
            resumed_from: start,
            downloaded: received,
        });
    }
    Err(http(format!(
        "the server refused the byte range twice; delete {} and retry",
        part.display()
    )))
}

fn agent(url: &str) -> ureq::Agent {
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| url.starts_with(p));
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)));
    if loopback {
        // A proxy from the environment cannot reach this machine's own loopback server.
        config = config.proxy(None);
    }
    config.build().into()
}

/// `bytes START-END/TOTAL` -> (START, TOTAL if known).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Unpacks a `.tgz` whose entries sit under one top-level folder (`imagenette2-320/...`) into
/// `dest`, without that folder. Entries go to a staging folder first; then each top-level item
/// replaces its namesake in `dest`. Links, devices and paths leaving the folder are refused.
pub fn unpack_tgz(archive: &Path, dest: &Path) -> Result<(), DataError> {
    let bad = |message: String| DataError::Archive {
        path: archive.to_path_buf(),
        message,
    };
    let staging = dest.join(".unpack.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let file = File::open(archive).map_err(io_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut top: Option<String> = None;
    for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                _ => {
                    return Err(bad(format!(
                        "entry `{}` leaves the archive's folder",
                        path.display()
                    )))
                }
            }
        }
        let Some((first, rest)) = parts.split_first() else {
            continue;
        };
        match &top {
            None => top = Some(first.clone()),
            Some(t) if t != first => {
                return Err(bad(format!(
                    "entries under both `{t}/` and `{first}/`: expected one top-level folder"
                )))
            }
            _ => {}
        }
        if rest.is_empty() {
            continue;
        }
        let target = rest.iter().fold(staging.clone(), |p, c| p.join(c));
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_err(&target))?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            entry
                .unpack(&target)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        } else {
            return Err(bad(format!(
                "entry `{}` is not a file or folder ({kind:?})",
                path.display()
            )));
        }
    }
    for split in ["train", "val"] {
        if !staging.join(split).is_dir() {
            std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
            return Err(bad(format!(
                "no `{split}/` folder inside: not an ImageNette archive"
            )));
        }
    }
    for entry in std::fs::read_dir(&staging).map_err(io_err(&staging))? {
        let from = entry.map_err(io_err(&staging))?.path();
        let to = dest.join(from.file_name().unwrap());
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(io_err(&to))?;
        } else if to.exists() {
            std::fs::remove_file(&to).map_err(io_err(&to))?;
        }
        std::fs::rename(&from, &to).map_err(io_err(&to))?;
    }
    std::fs::remove_dir(&staging).map_err(io_err(&staging))?;
    Ok(())
}
