//! The enums of the JSON API that are strings on the wire and keep a string this build does not
//! know ([`crate::knob`]'s and [`crate::tuner`]'s), made by one macro so that every one reads and
//! writes alike.

/// An enum written as a string, with an `Other(String)` keeping any string it does not know;
/// its [`Default`] is the empty `Other` (a writer that did not say).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// Any other string (a newer writer's), kept as written.
            Other(String),
        }

        impl $name {
            /// The known values, in declaration order.
            pub const KNOWN: &'static [$name] = &[$($name::$variant),*];

            /// The value as written on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)*
                    $name::Other(s) => s,
                }
            }

            /// The value of a wire string: a known one, or `Other` keeping `s`. Never fails.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $($wire => $name::$variant,)*
                    _ => $name::Other(s.to_string()),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::Other(String::new())
            }
        }

        /// The lenient reading, as `from_wire`.
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from_wire(s)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(deserializer)?;
                Ok($name::from_wire(&s))
            }
        }
    };
}
