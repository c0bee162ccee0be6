//! One spelling for each wire value. serde's derived `Deserialize` reads a struct from a JSON
//! array of its fields in order as well as from an object (`["<base64>", [["<keyid>", "<sig>"]]]`
//! was a release), and a unit enum variant from `{"high": null}` as well as from `"high"`. The
//! wire formats are objects and strings; other readers of the same signed bytes (an operator's
//! script, a reviewer's tool) would not see a release or a manifest in those shapes, so the
//! device must not either. These helpers accept only the documented shape.

use core::fmt;
use core::marker::PhantomData;

use crate::prelude::*;
use serde::de::value::{MapAccessDeserializer, StringDeserializer};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// `T`, read only from a JSON object.
#[derive(Debug)]
pub(crate) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

/// For `#[serde(deserialize_with)]` on a struct-typed field.
pub(crate) fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    Object::deserialize(deserializer).map(|Object(value)| value)
}

/// For an `Option` of a struct-typed field: `null` or absent (with `default`) is `None`.
pub(crate) fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(deserializer).map(|o| o.map(|Object(value)| value))
}

/// For a list of structs.
pub(crate) fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(deserializer)
        .map(|list| list.into_iter().map(|Object(value)| value).collect())
}

/// A unit-variant enum, read only from its string name.
pub(crate) fn string_enum<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    let name = String::deserialize(deserializer)?;
    T::deserialize(StringDeserializer::<D::Error>::new(name))
}

/// An `Option` of a unit-variant enum, read only from `null` or its string name.
pub(crate) fn optional_string_enum<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|name| T::deserialize(StringDeserializer::<D::Error>::new(name)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        a: u8,
        b: u8,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Level {
        High,
    }

    #[test]
    fn structs_only_from_objects() {
        // What serde's derive alone accepts:
        assert!(serde_json::from_str::<Pair>("[1, 2]").is_ok());
        let Object(pair) = serde_json::from_str::<Object<Pair>>(r#"{"a": 1, "b": 2}"#).unwrap();
        assert_eq!(pair, Pair { a: 1, b: 2 });
        assert!(serde_json::from_str::<Object<Pair>>("[1, 2]").is_err());
        let err = serde_json::from_str::<Object<Pair>>(r#"{"a": 1, "b": 2, "c": 3}"#);
        assert!(err.unwrap_err().to_string().contains("unknown field"));
        let err = serde_json::from_str::<Object<Pair>>(r#"{"a": 1, "a": 2, "b": 3}"#);
        assert!(err.unwrap_err().to_string().contains("duplicate field"));
    }

    #[test]
    fn enums_only_from_strings() {
        assert!(serde_json::from_str::<Level>(r#"{"high": null}"#).is_ok());
        let mut de = serde_json::Deserializer::from_str(r#""high""#);
        assert_eq!(string_enum::<_, Level>(&mut de).unwrap(), Level::High);
        let mut de = serde_json::Deserializer::from_str(r#"{"high": null}"#);
        assert!(string_enum::<_, Level>(&mut de).is_err());
        let mut de = serde_json::Deserializer::from_str("null");
        assert_eq!(optional_string_enum::<_, Level>(&mut de).unwrap(), None);
    }
}
