use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One source file as it travels through the pipeline and lands in a shard:
/// `{"id","text","meta":{...}}`, the layout DataTrove and HF `datasets` read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub meta: Map<String, Value>,
}

impl Document {
    /// The file path inside its source (used by the filename-based filters).
    pub fn path(&self) -> &str {
        self.meta
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or(&self.id)
    }
}

/// A document as a reader produced it: bytes not yet known to be text.
#[derive(Debug, Clone)]
pub struct RawDocument {
    pub id: String,
    pub bytes: Vec<u8>,
    pub meta: Map<String, Value>,
}
