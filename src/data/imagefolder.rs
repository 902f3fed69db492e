//! ImageFolder: `<split>/<class>/<image>`. Ids are `<class>/<file stem>`, stable across machines.

use std::path::{Path, PathBuf};

use super::DataError;

pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif", "JPEG", "JPG", "PNG",
];

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageItem {
    pub id: String,
    /// Relative to the split directory.
    pub path: String,
    pub class: String,
}

/// Lists a split directory, sorted by id. Files that are not images by extension are ignored.
pub fn scan(dir: &Path) -> Result<Vec<ImageItem>, DataError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    let mut items = Vec::new();
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(DataError::Invalid {
            path: dir.to_path_buf(),
            message: "no class folders: expected ImageFolder layout <split>/<class>/<image>".into(),
        });
    }
    for class_dir in classes {
        let class = class_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for entry in std::fs::read_dir(&class_dir).map_err(io(&class_dir))? {
            let p = entry.map_err(io(&class_dir))?.path();
            let ext_ok = p
                .extension()
                .map(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
                .unwrap_or(false);
            if !p.is_file() || !ext_ok {
                continue;
            }
            let stem = p.file_stem().unwrap().to_string_lossy();
            let name = p.file_name().unwrap().to_string_lossy();
            items.push(ImageItem {
                id: format!("{class}/{stem}"),
                path: format!("{class}/{name}"),
                class: class.clone(),
            });
        }
    }
    items.sort();
    Ok(items)
}
