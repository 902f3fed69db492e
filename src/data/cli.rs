//! The `cip data` subcommands: arguments (clap) -> the library calls of `demo`, `subset`, `fetch`
//! and `check` -> what they print. `main.rs` mounts [`DataCommand`] and calls [`run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Subcommand;

use super::check;
use super::demo::{self, DemoOptions};
use super::fetch::{self, FetchDataset, FetchOptions, ImagenetteSize};
use super::subset::{self, LinkKind, SubsetOptions};
use super::{ClassNames, DataError};

#[derive(Debug, Clone, Subcommand)]
pub enum DataCommand {
    /// Download a public dataset archive (SHA-256 verified, resumable) and unpack it as an
    /// ImageFolder with its classes.csv.
    Fetch {
        dataset: FetchDataset,
        /// Image size of the archive.
        #[arg(long, default_value = "320")]
        size: ImagenetteSize,
        /// Where to unpack [default: experiments/data/imagenette2-<size>].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Where the archives live (a mirror).
        #[arg(long, value_name = "URL", default_value = fetch::DEFAULT_URL_BASE)]
        url_base: String,
        /// Expected SHA-256 of the archive, instead of the published digests built into cip.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Keep the downloaded archive after unpacking.
        #[arg(long)]
        keep_archive: bool,
    },
    /// Make a class subset (ImageNette, ImageNet-100, ...) of a local ImageNet-1K tree by links,
    /// with a manifest.csv per split.
    Subset {
        /// ImageNet root: ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG.
        #[arg(long, value_name = "ROOT")]
        imagenet: PathBuf,
        /// Class file (CSV with an `id` column of WordNet ids), e.g. experiments/classes/imagenette.csv.
        #[arg(long, value_name = "FILE")]
        classes: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "symlink")]
        link: LinkKind,
        #[arg(long, value_delimiter = ',', default_value = "train,val")]
        splits: Vec<String>,
        /// Labels for a flat (unsorted) ILSVRC2012 val folder: Kaggle's LOC_val_solution.csv.
        #[arg(long, value_name = "CSV")]
        val_labels: Option<PathBuf>,
    },
    /// Check an ImageFolder dataset: counts per split and class, every image decoded, size range.
    /// Exits non-zero when it finds a problem.
    Check {
        /// A dataset root (<split>/<class>/<image>) or a single split (<class>/<image>).
        dir: PathBuf,
        /// Also check that each split has exactly the classes of this class file.
        #[arg(long, value_name = "FILE")]
        classes: Option<PathBuf>,
    },
    /// Draw a small labelled demo image set (one picture family per class), deterministic for a
    /// seed.
    Demo {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Number of classes (1 to 10).
        #[arg(long, default_value_t = 4)]
        classes: usize,
        #[arg(long, default_value_t = 6)]
        train_per_class: usize,
        #[arg(long, default_value_t = 4)]
        val_per_class: usize,
        /// Width and height in pixels.
        #[arg(long, default_value_t = 32)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Runs one `cip data` command, printing its summary on stdout (a progress bar, if any, on
/// stderr). `check` prints its report and then fails with `CheckFailed` when it found problems.
pub fn run(cmd: DataCommand) -> Result<(), DataError> {
    match cmd {
        DataCommand::Fetch {
            dataset,
            size,
            out,
            url_base,
            sha256,
            keep_archive,
        } => {
            let opts = FetchOptions {
                dataset,
                size,
                out: out.unwrap_or_else(|| size.default_out()),
                url_base,
                sha256,
                keep_archive,
                progress: std::io::stderr().is_terminal(),
            };
            println!("fetching {}", opts.url());
            let s = fetch::fetch(&opts)?;
            print!("{}", render_fetch(&s));
        }
        DataCommand::Subset {
            imagenet,
            classes,
            out,
            link,
            splits,
            val_labels,
        } => {
            let opts = SubsetOptions {
                imagenet,
                classes,
                out,
                link,
                splits,
                val_labels,
            };
            let summaries = subset::subset(&opts)?;
            print!("{}", render_subset(&opts, &summaries));
        }
        DataCommand::Check { dir, classes } => {
            let names = classes.as_deref().map(ClassNames::read).transpose()?;
            let report = check::check(&dir, names.as_ref())?;
            print!("{report}");
            if !report.problems.is_empty() {
                return Err(DataError::CheckFailed {
                    dir,
                    problems: report.problems.len(),
                });
            }
        }
        DataCommand::Demo {
            out,
            classes,
            train_per_class,
            val_per_class,
            size,
            seed,
        } => {
            let opts = DemoOptions {
                out,
                classes,
                train_per_class,
                val_per_class,
                size,
                seed,
            };
            let s = demo::draw(&opts)?;
            print!("{}", render_demo(&opts, &s));
        }
    }
    Ok(())
}

pub fn render_demo(opts: &DemoOptions, s: &demo::DemoSummary) -> String {
    let mut out = format!(
        "demo set in {}: {} classes, {} train + {} val per class, {}x{} px, seed {}\n",
        opts.out.display(),
        s.classes.len(),
        opts.train_per_class,
        opts.val_per_class,
        opts.size,
        opts.size,
        opts.seed
    );
    for ((id, name), family) in s.classes.iter().zip(demo::FAMILIES) {
        out.push_str(&format!("  {id}  {name:<26} {family:?}\n"));
    }
    out.push_str(&format!(
        "{} images; wrote {} file(s), {} unchanged{}\n",
        s.images,
        s.written,
        s.unchanged,
        if s.removed > 0 {
            format!(", removed {} stale", s.removed)
        } else {
            String::new()
        }
    ));
    out
}

pub fn render_subset(opts: &SubsetOptions, summaries: &[subset::SplitSummary]) -> String {
    let mut out = format!(
        "subset of {} by {} into {}\n",
        opts.imagenet.display(),
        opts.classes.display(),
        opts.out.display()
    );
    for s in summaries {
        out.push_str(&format!(
            "  {}: {} classes, {} images ({}..{} per class): {} linked, {} unchanged{}\n",
            s.split,
            s.classes,
            s.images,
            s.min_per_class,
            s.max_per_class,
            s.linked,
            s.unchanged,
            if s.removed > 0 {
                format!(", {} stale link(s) removed", s.removed)
            } else {
                String::new()
            }
        ));
        if !s.foreign.is_empty() {
            out.push_str(&format!(
                "  note: {}/{} has folders not in the class file (left alone): {}\n",
                opts.out.display(),
                s.split,
                s.foreign.join(", ")
            ));
        }
    }
    out
}

pub fn render_fetch(s: &fetch::FetchSummary) -> String {
    let mut out = String::new();
    if s.already_done {
        out.push_str(&format!(
            "already fetched into {} (sha256 {})\n",
            s.out.display(),
            s.sha256
        ));
    } else {
        if s.resumed_from > 0 {
            out.push_str(&format!(
                "resumed at byte {}, received {} more\n",
                s.resumed_from, s.downloaded
            ));
        }
        out.push_str(&format!(
            "sha256 {} verified; unpacked into {}\n",
            s.sha256,
            s.out.display()
        ));
    }
    out.push_str(&format!(
        "train: {} images, val: {} images; classes: {}\n",
        s.train_images,
        s.val_images,
        s.out.join("classes.csv").display()
    ));
    out.push_str(&format!("note: {}\n", fetch::SPLIT_NOTE));
    out
}
