//! Hand-written HTTP/1.1: message heads, body framing, and I/O on a shared `TcpStream`.
//! The proxy's HTTP/1.1 path (`proxy::h1`) is built on it; it owns every byte Fulcrum reads
//! from or writes to an HTTP/1.1 peer, so what is accepted is exactly what is forwarded.

pub mod body;
pub mod head;
pub mod io;
