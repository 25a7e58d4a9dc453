//! Lenient JSON scalars: ids written as `42` or `42.0`, crowd flags as `0`/`1`/`true`.
//!
//! Python treats `42.0 == 42` as the same dictionary key, so files written by
//! Python tools sometimes carry float ids; they are accepted when integral.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// An integer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JsonId(pub i64);

impl<'de> Deserialize<'de> for JsonId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = JsonId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonId, E> {
                Ok(JsonId(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonId, E> {
                i64::try_from(v)
                    .map(JsonId)
                    .map_err(|_| E::custom(format!("id {v} is too large")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonId, E> {
                // 2^63 bounds: the cast below is exact for integral values inside.
                if v.fract() == 0.0 && v.abs() < 9.2e18 {
                    Ok(JsonId(v as i64))
                } else {
                    Err(E::custom(format!("id {v} is not an integer")))
                }
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// A crowd flag: any non-zero number or `true` marks a crowd region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JsonCrowd(pub bool);

impl<'de> Deserialize<'de> for JsonCrowd {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CrowdVisitor;
        impl Visitor<'_> for CrowdVisitor {
            type Value = JsonCrowd;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("0, 1 or a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<JsonCrowd, E> {
                Ok(JsonCrowd(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonCrowd, E> {
                Ok(JsonCrowd(v != 0))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonCrowd, E> {
                Ok(JsonCrowd(v != 0))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonCrowd, E> {
                Ok(JsonCrowd(v != 0.0))
            }
        }
        deserializer.deserialize_any(CrowdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_integral_floats_only() {
        let ok: Vec<JsonId> = serde_json::from_str("[3, 4.0, -2]").unwrap();
        assert_eq!(ok, vec![JsonId(3), JsonId(4), JsonId(-2)]);
        assert!(serde_json::from_str::<JsonId>("4.5").is_err());
        assert!(serde_json::from_str::<JsonId>("\"7\"").is_err());
        assert!(serde_json::from_str::<JsonId>("18446744073709551615").is_err());
    }

    #[test]
    fn crowd_flags() {
        let v: Vec<JsonCrowd> = serde_json::from_str("[0, 1, 2, true, false, 0.0]").unwrap();
        let flags: Vec<bool> = v.into_iter().map(|c| c.0).collect();
        assert_eq!(flags, vec![false, true, true, true, false, false]);
    }
}
