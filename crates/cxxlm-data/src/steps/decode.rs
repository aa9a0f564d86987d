use super::Verdict;
use crate::document::{Document, RawDocument};

/// Bytes to text: binary (NUL bytes) and invalid UTF-8 are dropped. The dropped
/// document keeps a lossy decoding so the removed-documents output can still show it.
pub fn decode(raw: RawDocument) -> (Document, Verdict) {
    let RawDocument { id, bytes, meta } = raw;
    if memchr::memchr(0, &bytes).is_some() {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        return (Document { id, text, meta }, Verdict::Drop("binary"));
    }
    match String::from_utf8(bytes) {
        Ok(text) => (Document { id, text, meta }, Verdict::Keep),
        Err(e) => {
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            (Document { id, text, meta }, Verdict::Drop("invalid_utf8"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(bytes: &[u8]) -> RawDocument {
        RawDocument {
            id: "x".into(),
            bytes: bytes.to_vec(),
            meta: Default::default(),
        }
    }

    #[test]
    fn text_binary_and_invalid_utf8() {
        assert_eq!(decode(raw(b"int x;\n")).1, Verdict::Keep);
        assert_eq!(decode(raw(b"int\0x;")).1, Verdict::Drop("binary"));
        let (d, v) = decode(raw(b"caf\xe9;"));
        assert_eq!(v, Verdict::Drop("invalid_utf8"));
        assert_eq!(d.text, "caf\u{fffd};");
    }
}
