//! HTTP/1.1 request framing, judged once for every engine: a head is well-formed and
//! unambiguous (`head`), a chunked body keeps to its grammar (`chunked`), and a
//! connection's bytes are let through to a reader only request by request (`stream`).
//! Envoy's codec is the measure: what it refuses with a 4xx, this refuses too.

mod chunked;
mod head;
mod stream;

pub use chunked::ChunkedScanner;
pub use head::{check_request_head, origin_form, BodyFraming, Framing, Refusal};
pub use stream::{Refused, RequestStream, Scanned};
