//! The fields a raw shape accepts at a path, so an unknown field's message can list them
//! (`unknown field `capcity`, expected `capacity` or `timeout``), as serde's own
//! `deny_unknown_fields` would. Found by deserializing the shape from a probe that follows the
//! path (one map entry or one sequence element at each step) and notes the field names the
//! struct at its end declares; no value is built.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// One step of a path: a field, or an element of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

type Fields = &'static [&'static str];

/// The field names of the struct `T` has at `path`, if `path` leads to one.
pub(super) fn fields_at<T: DeserializeOwned>(path: &[Step]) -> Option<Fields> {
    let found = Cell::new(None);
    let _ = T::deserialize(Probe {
        path,
        found: &found,
    });
    found.get()
}

/// Ends a probe (the shape is never built).
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

#[derive(Clone, Copy)]
struct Probe<'a> {
    path: &'a [Step],
    found: &'a Cell<Option<Fields>>,
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: Fields,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => {
                self.found.set(Some(fields));
                Err(Stop)
            }
            Some((Step::Key(key), rest)) => visitor.visit_map(Entry {
                key: Some(key.clone()),
                value: Probe { path: rest, ..self },
            }),
            Some((Step::Index(_), _)) => Err(Stop),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            Some((Step::Index(_), rest)) => {
                visitor.visit_seq(Element(Some(Probe { path: rest, ..self })))
            }
            _ => Err(Stop),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple tuple_struct map enum identifier ignored_any
    }
}

/// A map of one entry: the next step's key, and the probe for the rest of the path.
struct Entry<'a> {
    key: Option<String>,
    value: Probe<'a>,
}

impl<'de> de::MapAccess<'de> for Entry<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(self.value)
    }
}

/// A list of one element: the probe for the rest of the path.
struct Element<'a>(Option<Probe<'a>>);

impl<'de> de::SeqAccess<'de> for Element<'_> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Stop> {
        match self.0.take() {
            Some(probe) => seed.deserialize(probe).map(Some),
            None => Ok(None),
        }
    }
}
