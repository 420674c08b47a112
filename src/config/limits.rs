//! Fixed bounds on what a client may send. They are not settings (no field of the file changes
//! them) but they belong with the configuration: the listeners give them to hyper, the request
//! checks in `crate::route::checks` enforce them, and errors quote them.

/// Largest request head (request line and headers) read from a client, in bytes; larger gets
/// `431`. Bounds HTTP/1's read buffer and HTTP/2's header list.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one HTTP/1 request; more gets `431`.
pub const MAX_HEADERS: usize = 100;
/// Longest request target (path and query) forwarded, in bytes; longer gets `414`.
pub const MAX_URI_BYTES: usize = 16 * 1024;
