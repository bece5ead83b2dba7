//! The control socket's request parser.

use serde_json::json;

use crate::control::{parse_request, ControlError, Request};

/// One line from a control-socket client, whatever its bytes: the parser never panics, every
/// refusal is a `malformed` error with a message, and an accepted `set` means exactly what it
/// says: the same patch written back as a request parses to the same patch.
pub fn control_request(data: &[u8]) {
    match parse_request(data) {
        Ok(Request::Get) => {}
        Ok(Request::Set(patch)) => {
            let again = json!({"op": "set", "settings": patch}).to_string();
            match parse_request(again.as_bytes()) {
                Ok(Request::Set(p)) => assert_eq!(p, patch, "{again}"),
                _ => panic!("an accepted patch does not parse back: {again}"),
            }
        }
        Err(e) => {
            assert!(matches!(e, ControlError::Malformed(_)), "{e:?}");
            assert_eq!(e.kind(), "malformed");
            assert!(!e.to_string().is_empty());
        }
    }
}
