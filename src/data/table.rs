//! A CSV file held in memory with named columns.

use std::path::{Path, PathBuf};

use super::DataError;

#[derive(Debug, Clone)]
pub struct CsvTable {
    pub path: PathBuf,
    pub headers: Vec<String>,
    pub rows: Vec<csv::StringRecord>,
}

impl CsvTable {
    pub fn read(path: &Path) -> Result<CsvTable, DataError> {
        let csv_err = |source| DataError::Csv {
            path: path.to_path_buf(),
            source,
        };
        let mut reader = csv::ReaderBuilder::new()
            .comment(Some(b'#'))
            .from_path(path)
            .map_err(csv_err)?;
        let headers = reader
            .headers()
            .map_err(csv_err)?
            .iter()
            .map(str::to_string)
            .collect();
        let rows = reader
            .records()
            .collect::<Result<Vec<_>, _>>()
            .map_err(csv_err)?;
        Ok(CsvTable {
            path: path.to_path_buf(),
            headers,
            rows,
        })
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.headers.iter().position(|h| h == name)
    }

    /// The index of a column that must exist, with an error naming the file and the columns it has.
    pub fn require(&self, name: &str) -> Result<usize, DataError> {
        self.column(name).ok_or_else(|| DataError::Invalid {
            path: self.path.clone(),
            message: format!(
                "missing column `{name}` (columns: {})",
                self.headers.join(", ")
            ),
        })
    }
}

/// Writes rows with a header through a temp file and a rename, so a reader never sees half a file.
pub fn write_csv<I, R>(path: &Path, headers: &[&str], rows: I) -> Result<(), DataError>
where
    I: IntoIterator<Item = R>,
    R: IntoIterator,
    R::Item: AsRef<[u8]>,
{
    let tmp = path.with_extension("csv.tmp");
    let csv_err = |source| DataError::Csv {
        path: path.to_path_buf(),
        source,
    };
    {
        let mut w = csv::Writer::from_path(&tmp).map_err(csv_err)?;
        w.write_record(headers).map_err(csv_err)?;
        for row in rows {
            w.write_record(row).map_err(csv_err)?;
        }
        w.flush().map_err(|source| DataError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    std::fs::rename(&tmp, path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
