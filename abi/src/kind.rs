//! What a device is: the `kind` of a registry record, of the JSON API's devices and histograms,
//! and the `kind` label of `/metrics`. On the wire it is a lowercase string (`synthetic`,
//! `emulated`, `kernel`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a device is.
///
/// A kind this build does not know (a newer writer's, or a malformed one) is kept as it was
/// written, in [`DeviceKind::Other`], and written back unchanged: reading it never fails, so an
/// older `enlight top` still shows a newer daemon's devices, and an older daemon still exports a
/// newer device's figures under the kind it announced.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// One of enlight's paravirtual devices: a VMBus-style ring pair with signals, or the
    /// enlightened ring disk of the KVM VMM (`synthetic`).
    Synthetic,
    /// One of enlight's emulated devices (IDE disk, NE2000), trapping per register access
    /// (`emulated`).
    Emulated,
    /// A device of the kernel (a block device or a network interface) (`kernel`).
    Kernel,
    /// Any other string (the [`Default`], for a record or view that does not say, is the empty
    /// one).
    Other(String),
}

impl DeviceKind {
    /// The known kinds.
    pub const KNOWN: [DeviceKind; 3] = [
        DeviceKind::Synthetic,
        DeviceKind::Emulated,
        DeviceKind::Kernel,
    ];

    /// The kind as written on the wire and in labels.
    pub fn as_str(&self) -> &str {
        match self {
            DeviceKind::Synthetic => "synthetic",
            DeviceKind::Emulated => "emulated",
            DeviceKind::Kernel => "kernel",
            DeviceKind::Other(s) => s,
        }
    }

    /// The kind of a wire string: a known one, or [`DeviceKind::Other`] keeping `s`. Never
    /// fails (the lenient reading the JSON and the registry use); [`FromStr`] is the strict one.
    pub fn from_wire(s: &str) -> DeviceKind {
        s.parse()
            .unwrap_or_else(|_| DeviceKind::Other(s.to_string()))
    }
}

impl Default for DeviceKind {
    fn default() -> Self {
        DeviceKind::Other(String::new())
    }
}

/// The lenient reading, as [`DeviceKind::from_wire`].
impl From<&str> for DeviceKind {
    fn from(s: &str) -> Self {
        DeviceKind::from_wire(s)
    }
}

/// The lenient reading, as [`DeviceKind::from_wire`].
impl From<String> for DeviceKind {
    fn from(s: String) -> Self {
        match s.parse() {
            Ok(kind) => kind,
            Err(UnknownDeviceKind(s)) => DeviceKind::Other(s),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A string that names no known [`DeviceKind`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownDeviceKind(pub String);

impl fmt::Display for UnknownDeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown device kind {:?}: expected synthetic, emulated or kernel",
            self.0
        )
    }
}

impl std::error::Error for UnknownDeviceKind {}

impl FromStr for DeviceKind {
    type Err = UnknownDeviceKind;

    /// A known kind only (`synthetic`, `emulated`, `kernel`, exactly so).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "synthetic" => Ok(DeviceKind::Synthetic),
            "emulated" => Ok(DeviceKind::Emulated),
            "kernel" => Ok(DeviceKind::Kernel),
            _ => Err(UnknownDeviceKind(s.to_string())),
        }
    }
}

impl PartialEq<str> for DeviceKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DeviceKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<DeviceKind> for str {
    fn eq(&self, other: &DeviceKind) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<DeviceKind> for &str {
    fn eq(&self, other: &DeviceKind) -> bool {
        *self == other.as_str()
    }
}

impl Serialize for DeviceKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DeviceKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DeviceKind;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a device kind (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DeviceKind, E> {
                Ok(DeviceKind::from_wire(s))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_lowercase_strings_on_the_wire() {
        for (kind, s) in DeviceKind::KNOWN
            .into_iter()
            .zip(["synthetic", "emulated", "kernel"])
        {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<DeviceKind>(&format!("\"{s}\"")).unwrap(),
                kind
            );
            assert_eq!(kind.to_string(), s);
            assert_eq!(s.parse::<DeviceKind>(), Ok(kind.clone()));
            assert_eq!(kind, s);
            assert_eq!(s, kind);
        }
    }

    #[test]
    fn an_unknown_kind_is_kept_as_written_and_parse_says_what_is_wrong() {
        let k: DeviceKind = serde_json::from_str(r#""paravirt-v2""#).unwrap();
        assert_eq!(k, DeviceKind::Other("paravirt-v2".into()));
        assert_eq!(serde_json::to_string(&k).unwrap(), r#""paravirt-v2""#);
        // Case matters: the wire is lowercase.
        assert_eq!(
            DeviceKind::from_wire("Kernel"),
            DeviceKind::Other("Kernel".into())
        );
        let err = "Kernel".parse::<DeviceKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown device kind \"Kernel\": expected synthetic, emulated or kernel"
        );
        assert_eq!(DeviceKind::default().as_str(), "");
        // Not a string: an error, as before.
        assert!(serde_json::from_str::<DeviceKind>("3").is_err());
    }

    /// A struct holding a kind reads one it does not know rather than failing as a whole.
    #[test]
    fn a_view_with_an_unknown_kind_still_reads() {
        #[derive(Deserialize)]
        struct View {
            name: String,
            kind: DeviceKind,
        }
        let v: View = serde_json::from_str(r#"{"name":"d","kind":"future"}"#).unwrap();
        assert_eq!((v.name.as_str(), v.kind.as_str()), ("d", "future"));
    }
}
