//! Class files: folder id (WordNet id) -> the name used in prompts.
//!
//! Format: CSV with a header holding at least `id` and `name` (an `index` column is allowed);
//! lines starting with `#` are comments, used to name the file's source.

use std::collections::BTreeMap;
use std::path::Path;

use super::{CsvTable, DataError};

#[derive(Debug, Clone, Default)]
pub struct ClassNames {
    /// In file order.
    pub ids: Vec<String>,
    pub names: BTreeMap<String, String>,
}

impl ClassNames {
    pub fn read(path: &Path) -> Result<ClassNames, DataError> {
        let table = CsvTable::read(path)?;
        let id = table.require("id")?;
        let name = table.require("name")?;
        let mut out = ClassNames::default();
        for (i, row) in table.rows.iter().enumerate() {
            let (k, v) = (row.get(id).unwrap_or(""), row.get(name).unwrap_or(""));
            if k.is_empty() || v.is_empty() {
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("row {} has an empty id or name", i + 2),
                });
            }
            if out.names.insert(k.to_string(), v.to_string()).is_some() {
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("class id `{k}` appears twice"),
                });
            }
            out.ids.push(k.to_string());
        }
        Ok(out)
    }

    /// The prompt name of a folder id; folders absent from the file keep their id.
    pub fn name<'a>(&'a self, id: &'a str) -> &'a str {
        self.names.get(id).map(String::as_str).unwrap_or(id)
    }
}
