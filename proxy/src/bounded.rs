//! A serde `Deserializer` wrapper that bounds how many elements the length-prefixed sequences and
//! maps of one decoded value may yield in all: one per byte of input, plus [`SLACK`].
//!
//! Why: a format with length prefixes (bincode, postcard) decodes a sequence by asking for the
//! claimed number of elements, and an element of a zero-sized type (`()`, a unit struct,
//! `PhantomData`) reads no bytes. So `Vec<()>` with a claimed length of `u64::MAX` in an 8-byte
//! body loops 2^64 times, and neither the formats' byte limits nor their allocation caps ever
//! notice. Every element of any other type reads at least one byte, so real input never yields
//! more sequence elements than it has bytes; the budget only refuses what cannot be real (a
//! sequence of zero-sized values longer than the body, plus some slack, so that a short
//! `Vec<()>` behind a one-byte varint prefix still decodes). Tuples, structs and enum variants
//! have lengths fixed by their type and are not counted.
//!
//! The wrapper forwards every call to the format's own deserializer and wraps what comes back
//! (visitors, seeds, sequence, map and enum accesses), the way `serde_path_to_error` threads its
//! path through a value; it adds no decoding of its own. Everything is generic and inlined.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Sequence elements allowed beyond one per input byte (for zero-sized elements).
pub(crate) const SLACK: usize = 4096;

/// Elements left for the value being decoded.
pub(crate) struct Budget(Cell<usize>);

impl Budget {
    /// A budget for a value decoded from `input_len` bytes.
    pub(crate) fn for_input(input_len: usize) -> Self {
        Self(Cell::new(input_len.saturating_add(SLACK)))
    }

    #[inline]
    fn spend<E: de::Error>(&self) -> Result<(), E> {
        match self.0.get().checked_sub(1) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(
                "the sequences claim more elements than the input can hold",
            )),
        }
    }
}

/// Deserializes a `T` through [`Bounded`]: hand this to a format's seed-taking entry point.
pub(crate) struct BoundedSeed<'b, T> {
    budget: &'b Budget,
    _t: PhantomData<fn() -> T>,
}

impl<'b, T> BoundedSeed<'b, T> {
    pub(crate) fn new(budget: &'b Budget) -> Self {
        Self {
            budget,
            _t: PhantomData,
        }
    }
}

impl<'de, T: de::Deserialize<'de>> DeserializeSeed<'de> for BoundedSeed<'_, T> {
    type Value = T;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        T::deserialize(Bounded {
            de: d,
            budget: self.budget,
        })
    }
}

/// The wrapped deserializer.
struct Bounded<'b, D> {
    de: D,
    budget: &'b Budget,
}

/// A wrapped visitor; `COUNTED` when it visits a length-prefixed sequence or map (a type
/// parameter, so that the uncounted common case carries no flag and tests nothing).
struct Vis<'b, V, const COUNTED: bool> {
    v: V,
    budget: &'b Budget,
}

/// A wrapped seed (for elements, keys, values, variants).
struct Seed<'b, S> {
    s: S,
    budget: &'b Budget,
}

struct Seq<'b, A, const COUNTED: bool> {
    a: A,
    budget: &'b Budget,
}

struct Map<'b, A, const COUNTED: bool> {
    a: A,
    budget: &'b Budget,
}

struct Enum<'b, A> {
    a: A,
    budget: &'b Budget,
}

struct Variant<'b, A> {
    a: A,
    budget: &'b Budget,
}

impl<'b, D> Bounded<'b, D> {
    #[inline]
    fn vis<V, const COUNTED: bool>(&self, v: V) -> Vis<'b, V, COUNTED> {
        Vis {
            v,
            budget: self.budget,
        }
    }
}

/// Forwards `deserialize_*` methods whose lengths are not claimed by the input.
macro_rules! forward_fixed {
    ($($name:ident),* $(,)?) => {$(
        #[inline]
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            let v = self.vis::<V, false>(visitor);
            self.de.$name(v)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Bounded<'_, D> {
    type Error = D::Error;

    forward_fixed!(
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    /// Self-describing formats may yield any shape here, sequences included: counted.
    #[inline]
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, true>(visitor);
        self.de.deserialize_any(v)
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, true>(visitor);
        self.de.deserialize_seq(v)
    }

    #[inline]
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, true>(visitor);
        self.de.deserialize_map(v)
    }

    #[inline]
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_unit_struct(name, v)
    }

    #[inline]
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_newtype_struct(name, v)
    }

    #[inline]
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_tuple(len, v)
    }

    #[inline]
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_tuple_struct(name, len, v)
    }

    #[inline]
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_struct(name, fields, v)
    }

    #[inline]
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let v = self.vis::<V, false>(visitor);
        self.de.deserialize_enum(name, variants, v)
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

/// Forwards `visit_*` methods that carry a plain value.
macro_rules! forward_visit {
    ($($name:ident($t:ty)),* $(,)?) => {$(
        #[inline]
        fn $name<E: de::Error>(self, x: $t) -> Result<Self::Value, E> {
            self.v.$name(x)
        }
    )*};
}

impl<'de, V: Visitor<'de>, const COUNTED: bool> Visitor<'de> for Vis<'_, V, COUNTED> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.v.expecting(f)
    }

    forward_visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    #[inline]
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.v.visit_none()
    }

    #[inline]
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.v.visit_unit()
    }

    #[inline]
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.v.visit_some(Bounded {
            de: d,
            budget: self.budget,
        })
    }

    #[inline]
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.v.visit_newtype_struct(Bounded {
            de: d,
            budget: self.budget,
        })
    }

    #[inline]
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
        self.v.visit_seq(Seq::<A, COUNTED> {
            a,
            budget: self.budget,
        })
    }

    #[inline]
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
        self.v.visit_map(Map::<A, COUNTED> {
            a,
            budget: self.budget,
        })
    }

    #[inline]
    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
        self.v.visit_enum(Enum {
            a,
            budget: self.budget,
        })
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.s.deserialize(Bounded {
            de: d,
            budget: self.budget,
        })
    }
}

impl<'de, A: SeqAccess<'de>, const COUNTED: bool> SeqAccess<'de> for Seq<'_, A, COUNTED> {
    type Error = A::Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        let budget = self.budget;
        let next = self.a.next_element_seed(Seed { s: seed, budget })?;
        if COUNTED && next.is_some() {
            budget.spend()?;
        }
        Ok(next)
    }

    fn size_hint(&self) -> Option<usize> {
        self.a.size_hint()
    }
}

impl<'de, A: MapAccess<'de>, const COUNTED: bool> MapAccess<'de> for Map<'_, A, COUNTED> {
    type Error = A::Error;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let budget = self.budget;
        let next = self.a.next_key_seed(Seed { s: seed, budget })?;
        if COUNTED && next.is_some() {
            budget.spend()?;
        }
        Ok(next)
    }

    #[inline]
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.a.next_value_seed(Seed {
            s: seed,
            budget: self.budget,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.a.size_hint()
    }
}

impl<'b, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<'b, A> {
    type Error = A::Error;
    type Variant = Variant<'b, A::Variant>;

    #[inline]
    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), A::Error> {
        let budget = self.budget;
        let (value, a) = self.a.variant_seed(Seed { s: seed, budget })?;
        Ok((value, Variant { a, budget }))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<'_, A> {
    type Error = A::Error;

    #[inline]
    fn unit_variant(self) -> Result<(), A::Error> {
        self.a.unit_variant()
    }

    #[inline]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.a.newtype_variant_seed(Seed {
            s: seed,
            budget: self.budget,
        })
    }

    #[inline]
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let v = Vis::<V, false> {
            v: visitor,
            budget: self.budget,
        };
        self.a.tuple_variant(len, v)
    }

    #[inline]
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let v = Vis::<V, false> {
            v: visitor,
            budget: self.budget,
        };
        self.a.struct_variant(fields, v)
    }
}
