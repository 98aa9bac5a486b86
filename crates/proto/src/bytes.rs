//! Byte payloads (exec output, stdin) as base64 strings inside the JSON
//! frames. serde_json writes a `Vec<u8>` as an array of numbers, about 3.6
//! characters per byte and slow to parse; base64 is 1.33 and fast, which is
//! what large output and `cp` need. Arrays are still read, so a peer built
//! before the change is understood.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

pub fn serialize<S: Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&STANDARD.encode(data))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_any(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("base64 text or an array of bytes")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
        STANDARD.decode(text).map_err(|e| E::custom(format!("invalid base64: {e}")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(out)
    }
}

/// The same for an optional payload (`null` or absent is `None`).
pub mod option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match data {
            Some(data) => super::serialize(data, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super")] Vec<u8>);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(data)| data))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Chunk {
        #[serde(with = "super")]
        data: Vec<u8>,
    }

    #[test]
    fn bytes_travel_as_base64_and_arrays_are_still_read() {
        let chunk = Chunk { data: vec![0, 1, 2, 255, b'h', b'i'] };
        let text = serde_json::to_string(&chunk).unwrap();
        assert_eq!(text, r#"{"data":"AAEC/2hp"}"#);
        assert_eq!(serde_json::from_str::<Chunk>(&text).unwrap(), chunk);
        assert_eq!(serde_json::from_str::<Chunk>(r#"{"data":[0,1,2,255,104,105]}"#).unwrap(), chunk);
        assert!(serde_json::from_str::<Chunk>(r#"{"data":"not base64!"}"#).is_err());
        assert!(serde_json::from_str::<Chunk>(r#"{"data":[256]}"#).is_err());
    }
}
