//! The TLS ClientHello at the start of a connection, read without terminating TLS so that a
//! passthrough listener can route by SNI (and ALPN) and still send every byte on untouched.
//!
//! Hand-written rather than built on a TLS parsing crate: putting a ClientHello together
//! from several records and TCP reads falls to the caller of such a crate anyway, and what
//! is left (two extensions in a list of length-prefixed fields) is small, borrows from the
//! input instead of building the whole message, and is property-tested below.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// The longest ClientHello taken (its handshake body). Post-quantum key shares make modern
/// ones about 1.8 KiB; this leaves room for many more extensions without letting a client
/// make Fulcrum hold much for it.
pub const MAX_HELLO_LEN: usize = 64 * 1024;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 16 * 1024;
/// A ClientHello spread over more records than this is refused: real clients use one (or a
/// few when it is larger than a record), and each record costs a header to walk.
const MAX_RECORDS: u32 = 4096;
/// The least room made for one read; a ClientHello usually arrives whole in it.
const MIN_READ: usize = 2048;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const SERVER_NAME_HOST_NAME: u8 = 0;
/// RFC 1035: a DNS name is at most 253 characters in text form, without the final dot.
const MAX_HOST_NAME_LEN: usize = 253;

/// What a ClientHello asks for, as routing reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The SNI host name, lower-cased (ASCII); `None` when the client sent none.
    pub server_name: Option<String>,
    /// The ALPN protocols offered, in the client's order; empty when none.
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS ClientHello")]
    NotTls,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("TLS ClientHello longer than 64 KiB")]
    TooLong,
    #[error("no whole TLS ClientHello in time")]
    TimedOut,
    #[error("connection closed before a whole TLS ClientHello")]
    Closed,
    #[error("reading the TLS ClientHello: {0}")]
    Io(#[from] io::Error),
}

/// Pure: what is in `bytes` (the start of a connection). Ok(None): a ClientHello has begun
/// but more bytes are needed. Handles a ClientHello split across several TLS records
/// (handshake fragments) and across any number of TCP segments (callers just append).
pub fn parse(bytes: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    let mut reassembly = Reassembly::default();
    match reassembly.advance(bytes)? {
        Progress::NeedsUpTo(_) => Ok(None),
        Progress::Whole => reassembly.hello(bytes).map(Some),
    }
}

/// Reads from `stream` (appending to `buf`) until a whole ClientHello is there, for at most
/// `within`. Every byte read stays in `buf`, to be sent to the server untouched; bytes after
/// the ClientHello that arrived in the same read stay in `buf` too. `buf` is empty at first,
/// or holds the connection's first bytes already read; its capacity is reused.
pub async fn read(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    within: Duration,
) -> Result<ClientHello, HelloError> {
    tokio::time::timeout(within, read_until_whole(stream, buf))
        .await
        .unwrap_or(Err(HelloError::TimedOut))
}

async fn read_until_whole(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
) -> Result<ClientHello, HelloError> {
    // Kept across reads so that each read costs only the records it completes and a look at
    // the one begun, not a walk from the start (a client sending a byte at a time would
    // otherwise cost quadratic time); looking at every read is what refuses a client that
    // sent one wrong byte without waiting for more.
    let mut reassembly = Reassembly::default();
    loop {
        let needs_up_to = match reassembly.advance(buf)? {
            Progress::Whole => return reassembly.hello(buf),
            Progress::NeedsUpTo(end) => end,
        };
        buf.reserve(needs_up_to.saturating_sub(buf.len()).max(MIN_READ));
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Ok(0) => return Err(HelloError::Closed),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
    }
}

/// How far the records at the start of a connection have been taken in.
#[derive(Debug, Default, Clone, Copy)]
struct Reassembly {
    /// Offset just past the last whole record taken in.
    taken: usize,
    records: u32,
    /// Handshake bytes in the records taken in.
    handshake_bytes: usize,
    /// The handshake message's type and 24-bit length, as far as they have arrived.
    header: [u8; HANDSHAKE_HEADER_LEN],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Nothing more can be learnt before the input reaches this length.
    NeedsUpTo(usize),
    /// The whole ClientHello is in the records taken in.
    Whole,
}

impl Reassembly {
    /// Takes in the whole records of `bytes` past those taken in before (`bytes` must begin
    /// with the same bytes as last time), refusing what cannot begin a ClientHello as soon
    /// as the bytes show it.
    fn advance(&mut self, bytes: &[u8]) -> Result<Progress, HelloError> {
        loop {
            let rest = bytes.get(self.taken..).unwrap_or_default();
            check_record_start(rest, self.records == 0)?;
            let Some(length) = rest.get(3..RECORD_HEADER_LEN) else {
                return Ok(Progress::NeedsUpTo(self.taken + RECORD_HEADER_LEN));
            };
            let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
            if length == 0 {
                return Err(HelloError::Malformed("an empty handshake record"));
            }
            if length > MAX_RECORD_LEN {
                return Err(HelloError::Malformed("a record longer than 16 KiB"));
            }
            let record_end = RECORD_HEADER_LEN + length;
            let fragment = &rest[RECORD_HEADER_LEN..rest.len().min(record_end)];

            // The handshake header is checked from a record's first bytes, before the rest
            // of the record arrives: a client announcing too much is refused at once.
            let mut header = self.header;
            let known = self.handshake_bytes.min(HANDSHAKE_HEADER_LEN);
            let filled = (HANDSHAKE_HEADER_LEN - known).min(fragment.len());
            header[known..known + filled].copy_from_slice(&fragment[..filled]);
            if known + filled >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed(
                    "the first handshake message is not a ClientHello",
                ));
            }
            if known + filled == HANDSHAKE_HEADER_LEN && hello_len(&header) > MAX_HELLO_LEN {
                return Err(HelloError::TooLong);
            }

            if rest.len() < record_end {
                return Ok(Progress::NeedsUpTo(self.taken + record_end));
            }
            self.header = header;
            self.handshake_bytes += length;
            self.taken += record_end;
            self.records += 1;
            if self.handshake_bytes >= HANDSHAKE_HEADER_LEN + hello_len(&self.header) {
                return Ok(Progress::Whole);
            }
            if self.records >= MAX_RECORDS {
                return Err(HelloError::Malformed(
                    "a ClientHello spread over too many records",
                ));
            }
        }
    }

    /// The ClientHello in `bytes`, once `advance` said it is whole.
    fn hello(&self, bytes: &[u8]) -> Result<ClientHello, HelloError> {
        let message_len = HANDSHAKE_HEADER_LEN + hello_len(&self.header);
        let message = handshake_message(&bytes[..self.taken], message_len);
        parse_hello_body(&message[HANDSHAKE_HEADER_LEN..])
    }
}

fn hello_len(header: &[u8; HANDSHAKE_HEADER_LEN]) -> usize {
    usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3])
}

/// Refuses a record that cannot carry (the rest of) a ClientHello, from as few of its
/// bytes as have arrived.
fn check_record_start(record: &[u8], first: bool) -> Result<(), HelloError> {
    let not_tls = |inside: &'static str| {
        if first {
            HelloError::NotTls
        } else {
            HelloError::Malformed(inside)
        }
    };
    if record
        .first()
        .is_some_and(|&kind| kind != CONTENT_TYPE_HANDSHAKE)
    {
        return Err(not_tls(
            "a record other than handshake inside the ClientHello",
        ));
    }
    if record.get(1).is_some_and(|&major| major != 3) {
        return Err(not_tls("a record version other than TLS"));
    }
    match record.get(2) {
        // RFC 5246 E.1: a client may put {03,00} in the record carrying its first
        // ClientHello, to reach old servers; the hello's own version is checked later.
        Some(0) if first => Ok(()),
        Some(0) => Err(HelloError::Malformed("an SSL 3.0 record")),
        Some(5..) => Err(HelloError::Malformed("an unknown record version")),
        _ => Ok(()),
    }
}

/// The handshake message (header and body) the records in `records` carry, `message_len`
/// bytes of it: borrowed when the first record holds it all, as it nearly always does.
fn handshake_message(records: &[u8], message_len: usize) -> Cow<'_, [u8]> {
    let first_fragment = fragments(records).next().unwrap_or_default();
    if first_fragment.len() >= message_len {
        return Cow::Borrowed(&first_fragment[..message_len]);
    }
    let mut message = Vec::with_capacity(message_len);
    for fragment in fragments(records) {
        let wanted = (message_len - message.len()).min(fragment.len());
        message.extend_from_slice(&fragment[..wanted]);
        if message.len() == message_len {
            break;
        }
    }
    Cow::Owned(message)
}

/// The fragments of whole records that `advance` has checked.
fn fragments(mut records: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let length = records.get(3..RECORD_HEADER_LEN)?;
        let end = RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([length[0], length[1]]));
        let fragment = records.get(RECORD_HEADER_LEN..end)?;
        records = &records[end..];
        Some(fragment)
    })
}

/// RFC 8446 4.1.2 (and the TLS 1.2 layout it keeps for the fields read here).
fn parse_hello_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut hello_fields = Reader(body);
    let version = hello_fields.u16("truncated before its version")?;
    if version >> 8 != 3 || version < 0x0301 {
        return Err(HelloError::Malformed(
            "a client version older than TLS 1.0 or unknown",
        ));
    }
    hello_fields.take(32, "truncated random")?;
    let session_id = hello_fields.vec8("truncated session id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("a session id longer than 32 bytes"));
    }
    let cipher_suites = hello_fields.vec16("truncated cipher suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("an empty or odd cipher suite list"));
    }
    if hello_fields
        .vec8("truncated compression methods")?
        .is_empty()
    {
        return Err(HelloError::Malformed("no compression method"));
    }

    let mut hello = ClientHello::default();
    // A ClientHello of TLS 1.2 or older may end here, without extensions.
    if hello_fields.0.is_empty() {
        return Ok(hello);
    }
    let mut extensions = Reader(hello_fields.vec16("truncated extensions")?);
    if !hello_fields.0.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let (mut saw_server_name, mut saw_alpn) = (false, false);
    while !extensions.0.is_empty() {
        let kind = extensions.u16("truncated extension type")?;
        let data = extensions.vec16("truncated extension")?;
        // Two of a kind (RFC 8446 4.2 forbids it) could route on one name while the server
        // answers another.
        match kind {
            EXTENSION_SERVER_NAME if saw_server_name => {
                return Err(HelloError::Malformed("two server_name extensions"));
            }
            EXTENSION_SERVER_NAME => {
                saw_server_name = true;
                hello.server_name = parse_server_name(data)?;
            }
            EXTENSION_ALPN if saw_alpn => {
                return Err(HelloError::Malformed("two ALPN extensions"));
            }
            EXTENSION_ALPN => {
                saw_alpn = true;
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// RFC 6066 3: a list of names, of which only `host_name` exists.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut extension = Reader(data);
    let mut names = Reader(extension.vec16("truncated server name list")?);
    if !extension.0.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    let mut host_name = None;
    while !names.0.is_empty() {
        let kind = names.u8("truncated server name type")?;
        let name = names.vec16("truncated server name")?;
        if kind != SERVER_NAME_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        host_name = Some(normalized_host_name(name)?);
    }
    Ok(host_name)
}

/// The name lower-cased, without a final dot (the same DNS name, so it routes alike).
fn normalized_host_name(name: &[u8]) -> Result<String, HelloError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
        return Err(HelloError::Malformed("an empty or overlong host name"));
    }
    // RFC 6066 wants A-labels; anything else in a name would only reach logs and routing
    // tables as noise or as an attempt to confuse them.
    if !name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(HelloError::Malformed(
            "a host name with characters no DNS name has",
        ));
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// RFC 7301 3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut extension = Reader(data);
    let mut names = Reader(extension.vec16("truncated ALPN list")?);
    if !extension.0.is_empty() {
        return Err(HelloError::Malformed("bytes after the ALPN list"));
    }
    if names.0.is_empty() {
        return Err(HelloError::Malformed("an empty ALPN list"));
    }
    let mut protocols = Vec::new();
    while !names.0.is_empty() {
        let name = names.vec8("truncated ALPN protocol name")?;
        if name.is_empty() {
            return Err(HelloError::Malformed("an empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// The unread rest of a length-prefixed field; each read names what it was after, so that
/// a truncated field says which.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, truncated: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < len {
            return Err(HelloError::Malformed(truncated));
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, truncated: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, truncated)?[0])
    }

    fn u16(&mut self, truncated: &'static str) -> Result<u16, HelloError> {
        let bytes = self.take(2, truncated)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn vec8(&mut self, truncated: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(truncated)?;
        self.take(usize::from(len), truncated)
    }

    fn vec16(&mut self, truncated: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(truncated)?;
        self.take(usize::from(len), truncated)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A ClientHello from `openssl s_client -servername Example.COM -alpn h2,http/1.1`
    /// (OpenSSL 3.0), captured from a socket.
    const OPENSSL_HELLO: &str = "\
160301014a0100014603035dcb68766fb83d45178e62335960862d707e3613469f8a36f18ea4e53f9ac36f20403cd5cf\
b9c05594384bc25e4690bb8d1f92b45ec7fdef30d0f95d6249285e75003e130213031301c02cc030009fcca9cca8ccaa\
c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000bf\
00000010000e00000b4578616d706c652e434f4d000b000403000102000a00160014001d0017001e0019001801000101\
010201030104002300000010000e000c02683208687474702f312e310016000000170000000d002a0028040305030603\
080708080809080a080b080408050806040105010601030303010302040205020602002b000908030403030302030100\
2d00020101003300260024001d00203b903fc188103e5dea08af4077d8560cc1fe635b0fdebf2dde6faf14d546cc64";

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn client_config(
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
        roots: rustls::RootCertStore,
    ) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// The first bytes a rustls client sends to `target` (a host name or an IP address).
    fn rustls_hello(
        target: &str,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Vec<u8> {
        let config = client_config(alpn, versions, rustls::RootCertStore::empty());
        let name = ServerName::try_from(target.to_string()).unwrap();
        let mut connection = rustls::ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Real ClientHellos and what they ask for.
    fn samples() -> Vec<(Vec<u8>, ClientHello)> {
        let both: &[&'static rustls::SupportedProtocolVersion] = rustls::ALL_VERSIONS;
        let h2_h1: &[&[u8]] = &[b"h2", b"http/1.1"];
        let named = |name: &str, alpn: &[&[u8]]| ClientHello {
            server_name: Some(name.to_string()),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        };
        vec![
            (
                rustls_hello("Api.Example.com", &[], both),
                named("api.example.com", &[]),
            ),
            (
                rustls_hello("example.org", h2_h1, both),
                named("example.org", h2_h1),
            ),
            (
                rustls_hello(
                    "legacy.example.net",
                    &[b"http/1.1"],
                    &[&rustls::version::TLS12],
                ),
                named("legacy.example.net", &[b"http/1.1"]),
            ),
            (
                rustls_hello("127.0.0.1", h2_h1, both),
                ClientHello {
                    server_name: None,
                    alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                },
            ),
            (unhex(OPENSSL_HELLO), named("example.com", h2_h1)),
        ]
    }

    /// The handshake message in `single_record` (a hello as clients send it, in one record),
    /// cut into records at `cuts` (offsets into the message).
    fn refragment(single_record: &[u8], cuts: &[usize]) -> Vec<u8> {
        let message = &single_record[RECORD_HEADER_LEN..];
        let mut bounds: Vec<usize> = cuts
            .iter()
            .copied()
            .filter(|&cut| cut > 0 && cut < message.len())
            .collect();
        bounds.push(0);
        bounds.push(message.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut out = Vec::new();
        for pair in bounds.windows(2) {
            let piece = &message[pair[0]..pair[1]];
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// A single-record hello with the handshake body replaced by `body`.
    fn with_body(body: &[u8]) -> Vec<u8> {
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(body);
        let mut record = vec![CONTENT_TYPE_HANDSHAKE, 3, 1];
        record.extend_from_slice(&(message.len() as u16).to_be_bytes());
        record.extend_from_slice(&message);
        record
    }

    /// A minimal TLS 1.2 body with these extensions (type, data).
    fn body_with_extensions(extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // no session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut list = Vec::new();
        for (kind, data) in extensions {
            list.extend_from_slice(&kind.to_be_bytes());
            list.extend_from_slice(&(data.len() as u16).to_be_bytes());
            list.extend_from_slice(data);
        }
        body.extend_from_slice(&(list.len() as u16).to_be_bytes());
        body.extend_from_slice(&list);
        body
    }

    fn server_name_extension(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    fn malformed(result: Result<Option<ClientHello>, HelloError>) -> &'static str {
        match result {
            Err(HelloError::Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn real_hellos_give_their_server_name_and_alpn() {
        for (bytes, expected) in samples() {
            assert_eq!(parse(&bytes).unwrap(), Some(expected));
        }
    }

    #[test]
    fn every_strict_prefix_of_a_real_hello_asks_for_more() {
        for (bytes, _) in samples() {
            for end in 0..bytes.len() {
                assert!(
                    matches!(parse(&bytes[..end]), Ok(None)),
                    "prefix of {end} of {} bytes",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_do_not_change_it() {
        for (mut bytes, expected) in samples() {
            // A TLS 1.3 client's next records: change_cipher_spec, then early data.
            bytes.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 0xab, 0xcd]);
            assert_eq!(parse(&bytes).unwrap(), Some(expected));
        }
    }

    #[test]
    fn what_is_not_tls_is_told_from_its_first_bytes() {
        assert!(matches!(parse(b"G"), Err(HelloError::NotTls)));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::NotTls)
        ));
        assert!(matches!(parse(b"SSH-2.0-OpenSSH"), Err(HelloError::NotTls)));
        // An SSLv2-compatible hello: a two-byte length with the top bit set, then type 1.
        assert!(matches!(
            parse(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
            Err(HelloError::NotTls)
        ));
        // Handshake type, but no TLS version after it.
        assert!(matches!(parse(&[22, 0x47]), Err(HelloError::NotTls)));
        // An alert record (as a client refusing something would send) is not a hello either.
        assert!(matches!(
            parse(&[21, 3, 3, 0, 2, 2, 40]),
            Err(HelloError::NotTls)
        ));
        assert!(matches!(parse(&[]), Ok(None)));
        assert!(matches!(parse(&[22, 3]), Ok(None)));
    }

    #[test]
    fn ssl3_and_unknown_record_versions_are_refused() {
        // {03,00} in the first record is allowed (RFC 5246 E.1), not after it.
        let (real, expected) = samples().remove(0);
        let mut ssl3_record = real.clone();
        ssl3_record[2] = 0;
        assert_eq!(parse(&ssl3_record).unwrap(), Some(expected));
        let mut later_ssl3 = refragment(&real, &[40]);
        let second = RECORD_HEADER_LEN + 40;
        assert_eq!(later_ssl3[second..second + 3], [22, 3, 1]);
        later_ssl3[second + 2] = 0;
        assert_eq!(malformed(parse(&later_ssl3)), "an SSL 3.0 record");
        assert_eq!(malformed(parse(&[22, 3, 5])), "an unknown record version");
        let mut ssl3_client = body_with_extensions(&[]);
        ssl3_client[1] = 0;
        assert_eq!(
            malformed(parse(&with_body(&ssl3_client))),
            "a client version older than TLS 1.0 or unknown"
        );
    }

    #[test]
    fn a_hello_over_64_kib_is_refused_from_its_header() {
        // Only the record header and the handshake header have arrived.
        let announced = (MAX_HELLO_LEN + 1) as u32;
        let mut start = vec![22, 3, 1, 0x40, 0x00, HANDSHAKE_CLIENT_HELLO];
        start.extend_from_slice(&announced.to_be_bytes()[1..]);
        assert!(matches!(parse(&start), Err(HelloError::TooLong)));
        // The handshake header split over two records.
        let split = [22, 3, 1, 0, 2, 1, 0x01, 22, 3, 1, 0, 2, 0x00, 0x01];
        assert!(matches!(parse(&split), Err(HelloError::TooLong)));
        // 64 KiB itself is taken.
        let mut at_limit = vec![22, 3, 1, 0x40, 0x00, HANDSHAKE_CLIENT_HELLO];
        at_limit.extend_from_slice(&(MAX_HELLO_LEN as u32).to_be_bytes()[1..]);
        assert!(matches!(parse(&at_limit), Ok(None)));
    }

    #[test]
    fn records_that_cannot_carry_a_hello_are_refused() {
        assert_eq!(
            malformed(parse(&[22, 3, 1, 0, 0])),
            "an empty handshake record"
        );
        assert_eq!(
            malformed(parse(&[22, 3, 1, 0x40, 0x01])),
            "a record longer than 16 KiB"
        );
        assert_eq!(
            malformed(parse(&[22, 3, 1, 0, 4, 2])),
            "the first handshake message is not a ClientHello"
        );
        // The hello begun in one record, interrupted by application data.
        let (hello, _) = samples().remove(0);
        let mut interrupted = refragment(&hello, &[100]);
        let second = RECORD_HEADER_LEN + 100;
        interrupted[second] = 23;
        assert_eq!(
            malformed(parse(&interrupted)),
            "a record other than handshake inside the ClientHello"
        );
        interrupted[second] = 22;
        interrupted[second + 1] = 0x47;
        assert_eq!(
            malformed(parse(&interrupted)),
            "a record version other than TLS"
        );
    }

    #[test]
    fn a_hello_in_too_many_records_is_refused() {
        // A hello padded (RFC 7685) past the record limit, sent a byte per record.
        let padded = with_body(&body_with_extensions(&[
            (
                EXTENSION_SERVER_NAME,
                &server_name_extension(&[(0, b"a.b")]),
            ),
            (21, &[0; 5000]),
        ]));
        let expected = ClientHello {
            server_name: Some("a.b".into()),
            alpn: vec![],
        };
        assert_eq!(parse(&padded).unwrap(), Some(expected.clone()));
        let cuts: Vec<usize> = (1..padded.len()).collect();
        assert_eq!(
            malformed(parse(&refragment(&padded, &cuts))),
            "a ClientHello spread over too many records"
        );
        // Two bytes per record stays within the limit.
        let cuts: Vec<usize> = (1..padded.len()).step_by(2).collect();
        assert!(cuts.len() < MAX_RECORDS as usize);
        assert_eq!(parse(&refragment(&padded, &cuts)).unwrap(), Some(expected));
    }

    #[test]
    fn server_names_are_lower_cased_and_checked() {
        let hello = |names: &[(u8, &[u8])]| {
            parse(&with_body(&body_with_extensions(&[(
                EXTENSION_SERVER_NAME,
                &server_name_extension(names),
            )])))
        };
        let name =
            |result: Result<Option<ClientHello>, HelloError>| result.unwrap().unwrap().server_name;
        assert_eq!(
            name(hello(&[(0, b"WWW.Example.COM")])).unwrap(),
            "www.example.com"
        );
        assert_eq!(name(hello(&[(0, b"example.com.")])).unwrap(), "example.com");
        assert_eq!(
            name(hello(&[(0, b"_svc.in-ternal")])).unwrap(),
            "_svc.in-ternal"
        );
        // Another name type than host_name is passed over.
        assert_eq!(name(hello(&[(7, b"x"), (0, b"a.b")])).unwrap(), "a.b");
        assert_eq!(name(hello(&[])), None);
        assert_eq!(name(hello(&[(7, b"x")])), None);
        for bad in [&b""[..], b".", b"a b", b"caf\xc3\xa9.fr", b"a\r\nb", b"a/b"] {
            assert_eq!(
                malformed(hello(&[(0, bad)])),
                if bad.len() <= 1 {
                    "an empty or overlong host name"
                } else {
                    "a host name with characters no DNS name has"
                },
                "{bad:?}"
            );
        }
        assert_eq!(
            malformed(hello(&[(0, &[b'a'; 254])])),
            "an empty or overlong host name"
        );
        assert_eq!(
            malformed(hello(&[(0, b"a.b"), (0, b"c.d")])),
            "two host names"
        );
        let twice = body_with_extensions(&[
            (
                EXTENSION_SERVER_NAME,
                &server_name_extension(&[(0, b"a.b")]),
            ),
            (
                EXTENSION_SERVER_NAME,
                &server_name_extension(&[(0, b"c.d")]),
            ),
        ]);
        assert_eq!(
            malformed(parse(&with_body(&twice))),
            "two server_name extensions"
        );
    }

    #[test]
    fn alpn_lists_are_checked() {
        let hello =
            |data: &[u8]| parse(&with_body(&body_with_extensions(&[(EXTENSION_ALPN, data)])));
        assert_eq!(
            hello(&[0, 6, 2, b'h', b'2', 2, b'h', b'3'])
                .unwrap()
                .unwrap()
                .alpn,
            vec![b"h2".to_vec(), b"h3".to_vec()]
        );
        assert_eq!(malformed(hello(&[0, 0])), "an empty ALPN list");
        assert_eq!(malformed(hello(&[0, 1, 0])), "an empty ALPN protocol name");
        assert_eq!(
            malformed(hello(&[0, 3, 5, b'h', b'2'])),
            "truncated ALPN protocol name"
        );
        assert_eq!(malformed(hello(&[0, 1, 0, 9])), "bytes after the ALPN list");
    }

    #[test]
    fn a_hello_without_extensions_asks_for_nothing() {
        let mut body = body_with_extensions(&[]);
        body.truncate(body.len() - 2);
        assert_eq!(
            parse(&with_body(&body)).unwrap(),
            Some(ClientHello::default())
        );
        body.push(0);
        assert_eq!(malformed(parse(&with_body(&body))), "truncated extensions");
    }

    /// Up to `max` places to cut something, spread over whatever its length.
    fn cuts(max: usize) -> impl Strategy<Value = Vec<proptest::sample::Index>> {
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..max)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// However a real hello is cut into records, and those into TCP reads, each read
        /// asks for more until the last, which gives what the hello asks for; reading on
        /// from where the last read stopped agrees with reading from the start.
        #[test]
        fn any_split_into_records_and_reads_gives_the_same_hello(
            which in 0..5usize,
            record_cuts in cuts(12),
            read_cuts in cuts(12),
        ) {
            let (single, expected) = samples().swap_remove(which);
            let message_len = single.len() - RECORD_HEADER_LEN;
            let record_cuts: Vec<usize> = record_cuts.iter().map(|c| c.index(message_len)).collect();
            let bytes = refragment(&single, &record_cuts);
            let mut ends: Vec<usize> = read_cuts.iter().map(|c| c.index(bytes.len())).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            ends.dedup();
            let mut resumed = Reassembly::default();
            let mut outcome = None;
            for &end in &ends {
                let fresh = parse(&bytes[..end]).unwrap();
                let progress = resumed.advance(&bytes[..end]).unwrap();
                if end < bytes.len() {
                    prop_assert_eq!(fresh, None);
                    prop_assert!(matches!(progress, Progress::NeedsUpTo(n) if n > end));
                } else {
                    prop_assert_eq!(progress, Progress::Whole);
                    outcome = fresh;
                }
            }
            prop_assert_eq!(outcome.as_ref(), Some(&expected));
            prop_assert_eq!(resumed.hello(&bytes).unwrap(), expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }

        /// Bytes after a plausible record header reach the handshake and body parsing.
        #[test]
        fn arbitrary_records_never_panic(
            fragment in proptest::collection::vec(any::<u8>(), 0..600),
            body_len in 0..700u32,
        ) {
            let mut message = vec![HANDSHAKE_CLIENT_HELLO];
            message.extend_from_slice(&body_len.to_be_bytes()[1..]);
            message.extend_from_slice(&fragment);
            let mut bytes = vec![22, 3, 3];
            bytes.extend_from_slice(&(message.len() as u16).to_be_bytes());
            bytes.extend_from_slice(&message);
            let _ = parse(&bytes);
        }

        /// A real hello with bytes changed never panics, and what it gives (if anything)
        /// is a hello whose name passed the checks.
        #[test]
        fn damaged_real_hellos_never_panic(
            which in 0..5usize,
            damage in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let (mut bytes, _) = samples().swap_remove(which);
            for (at, value) in damage {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if let Ok(Some(ClientHello { server_name: Some(name), .. })) = parse(&bytes) {
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')));
            }
        }
    }

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    const GENEROUS: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_hello_written_a_byte_at_a_time_is_read_whole_and_kept() {
        let (hello, expected) = samples().swap_remove(1);
        let (mut client, server) = connected_pair().await;
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for byte in &sent {
                client.write_all(std::slice::from_ref(byte)).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = Vec::new();
        let read_hello = read(&server, &mut buf, GENEROUS).await.unwrap();
        assert_eq!(read_hello, expected);
        assert_eq!(buf, hello);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn bytes_after_the_hello_stay_in_the_buffer_or_the_socket() {
        let (hello, expected) = samples().swap_remove(0);
        let (mut client, mut server) = connected_pair().await;
        let mut sent = refragment(&hello, &[300, 301]);
        let after = b"\x14\x03\x03\x00\x01\x01 and early data";
        sent.extend_from_slice(after);
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(read(&server, &mut buf, GENEROUS).await.unwrap(), expected);
        assert!(buf.len() >= sent.len() - after.len());
        server.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, sent);
    }

    #[tokio::test]
    async fn what_is_not_tls_is_refused_without_waiting_for_more() {
        let mut too_long = vec![22, 3, 1, 0x40, 0, HANDSHAKE_CLIENT_HELLO];
        too_long.extend_from_slice(&(MAX_HELLO_LEN as u32 + 1).to_be_bytes()[1..]);
        let firsts: [(&[u8], &str); 4] = [
            (b"G", "Err(NotTls)"),
            (b"GET / HTTP/1.1\r\n", "Err(NotTls)"),
            (&[22, 3, 5], "Err(Malformed("),
            (&too_long, "Err(TooLong)"),
        ];
        for (first, expected) in firsts {
            // The client sends only these bytes and waits.
            let (mut client, server) = connected_pair().await;
            client.write_all(first).await.unwrap();
            let started = Instant::now();
            let mut buf = Vec::new();
            let result = format!("{:?}", read(&server, &mut buf, GENEROUS).await);
            assert!(result.starts_with(expected), "{result} after {first:?}");
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(first.starts_with(&buf) && !buf.is_empty());
            drop(client);
        }
    }

    #[tokio::test]
    async fn a_hello_that_stops_coming_times_out_and_one_cut_short_is_closed() {
        let (hello, _) = samples().swap_remove(0);
        let (mut client, server) = connected_pair().await;
        client.write_all(&hello[..40]).await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let result = read(&server, &mut buf, Duration::from_millis(300)).await;
        assert!(matches!(result, Err(HelloError::TimedOut)), "{result:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5));

        let (mut client, server) = connected_pair().await;
        client.write_all(&hello[..40]).await.unwrap();
        drop(client);
        let mut buf = Vec::new();
        let result = read(&server, &mut buf, GENEROUS).await;
        assert!(matches!(result, Err(HelloError::Closed)), "{result:?}");
        assert_eq!(buf, &hello[..40]);
    }

    /// The whole point: a real TLS client names a server, the hello is read for it, and
    /// the bytes read, sent on to a real TLS server followed by the rest of the connection,
    /// make a handshake that succeeds end to end.
    #[tokio::test]
    async fn the_bytes_read_complete_a_real_handshake_when_passed_on() {
        let certified = rcgen::generate_simple_self_signed(vec!["api.example.com".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .unwrap();
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server_config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let backend_task = tokio::spawn(async move {
            let (socket, _) = backend.accept().await.unwrap();
            let mut tls = acceptor.accept(socket).await.unwrap();
            let mut request = [0u8; 4];
            tls.read_exact(&mut request).await.unwrap();
            assert_eq!(&request, b"ping");
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.unwrap();
        });

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(
            &[b"h2", b"http/1.1"],
            rustls::DEFAULT_VERSIONS,
            roots,
        ));
        let client_task = tokio::spawn(async move {
            let socket = TcpStream::connect(front_addr).await.unwrap();
            let name = ServerName::try_from("API.example.com").unwrap();
            let mut tls = connector.connect(name, socket).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            tls.write_all(b"ping").await.unwrap();
            let mut answer = Vec::new();
            tls.read_to_end(&mut answer).await.unwrap();
            answer
        });

        let (mut downstream, _) = front.accept().await.unwrap();
        let mut buf = Vec::new();
        let hello = read(&downstream, &mut buf, GENEROUS).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(hello.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        let mut upstream = TcpStream::connect(backend_addr).await.unwrap();
        upstream.write_all(&buf).await.unwrap();
        let relay = tokio::io::copy_bidirectional(&mut downstream, &mut upstream);
        let answer = tokio::time::timeout(GENEROUS, async {
            let (relayed, answer) = tokio::join!(relay, client_task);
            relayed.unwrap();
            answer.unwrap()
        })
        .await
        .unwrap();
        assert_eq!(answer, b"pong");
        backend_task.await.unwrap();
    }
}
