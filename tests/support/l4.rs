//! Real TCP servers and clients for the L4 tests: servers that say who they are and echo,
//! TLS servers for SNI routing, a server that reads a PROXY protocol header first, and
//! clients from a chosen loopback address.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::tls::Issued;

/// A PROXY header as a server read it: source and destination (`None` for a LOCAL or
/// UNKNOWN header), or what was wrong with it.
pub type SeenHeader = Result<Option<(SocketAddr, SocketAddr)>, String>;

/// What a test server saw.
#[derive(Default)]
pub struct Counts {
    /// Connections accepted.
    pub accepted: AtomicUsize,
    /// Connections open now.
    pub open: AtomicUsize,
    /// Bytes received, over every connection.
    pub received: AtomicUsize,
    /// Each connection's PROXY header, if the server reads one: its source and destination
    /// (`None` for a LOCAL/UNKNOWN header), or what was wrong with it.
    pub headers: Mutex<Vec<SeenHeader>>,
}

/// Counts a connection open until dropped.
struct Open(Arc<Counts>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP server on 127.0.0.1 that writes `name` and a newline to each connection, then
/// sends back whatever it reads until the client closes its side, and closes too.
pub struct TcpServer {
    pub addr: SocketAddr,
    pub name: &'static str,
    pub counts: Arc<Counts>,
    accept: tokio::task::AbortHandle,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TcpServer {
    pub async fn named(name: &'static str) -> TcpServer {
        TcpServer::serve(name, false).await
    }

    /// Like [`TcpServer::named`], but each connection must open with a PROXY protocol
    /// header (v1 or v2), which is recorded in `counts.headers`; one that does not is closed.
    pub async fn reading_proxy_header(name: &'static str) -> TcpServer {
        TcpServer::serve(name, true).await
    }

    async fn serve(name: &'static str, proxy_header: bool) -> TcpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let seen = counts.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                seen.open.fetch_add(1, Ordering::SeqCst);
                let open = Open(seen.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    if proxy_header {
                        let header = read_proxy_header(&mut stream, &mut pending).await;
                        let ok = header.is_ok();
                        open.0.headers.lock().unwrap().push(header);
                        if !ok {
                            return;
                        }
                    }
                    open.0.received.fetch_add(pending.len(), Ordering::SeqCst);
                    let _ = echo(&mut stream, name, &pending, &open.0).await;
                    drop(open);
                });
            }
        });
        TcpServer {
            addr,
            name,
            counts,
            accept: accept.abort_handle(),
        }
    }

    /// Stops accepting and closes the listening socket: new connections are refused.
    pub fn stop(&self) {
        self.accept.abort();
    }

    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }
}

async fn echo(
    stream: &mut TcpStream,
    name: &str,
    pending: &[u8],
    counts: &Counts,
) -> std::io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes()).await?;
    stream.write_all(pending).await?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        counts.received.fetch_add(n, Ordering::SeqCst);
        stream.write_all(&buf[..n]).await?;
    }
}

/// Reads a PROXY protocol header with the `ppp` crate, byte by byte as it comes, for at
/// most 10 s; bytes read past it go to `rest`.
async fn read_proxy_header(stream: &mut TcpStream, rest: &mut Vec<u8>) -> SeenHeader {
    use ppp::PartialResult;
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 512];
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed after {} bytes", buf.len()));
            }
            buf.extend_from_slice(&chunk[..n]);
            let parsed = ppp::HeaderResult::parse(&buf);
            if parsed.is_incomplete() {
                continue;
            }
            return match parsed {
                ppp::HeaderResult::V1(Ok(h)) => {
                    let len = h.header.len();
                    let addresses = match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        ppp::v1::Addresses::Tcp6(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        ppp::v1::Addresses::Unknown => None,
                    };
                    Ok((len, addresses))
                }
                ppp::HeaderResult::V2(Ok(h)) => {
                    let len = h.header.len();
                    let addresses = match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        ppp::v2::Addresses::IPv6(a) => Some((
                            (a.source_address, a.source_port).into(),
                            (a.destination_address, a.destination_port).into(),
                        )),
                        _ => None,
                    };
                    Ok((len, addresses))
                }
                ppp::HeaderResult::V1(Err(e)) => Err(format!("v1: {e}")),
                ppp::HeaderResult::V2(Err(e)) => Err(format!("v2: {e}")),
            };
        }
    };
    let (len, addresses) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| "no header within 10 s".to_string())??;
    rest.extend_from_slice(&buf[len..]);
    Ok(addresses)
}

/// A TLS server on 127.0.0.1 (rustls) with `issued`'s certificate, offering `alpn`: after
/// the handshake it writes `name`, a space, the protocol ALPN chose (`-` for none) and a
/// newline, then echoes until the client closes.
pub struct TlsServer {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    accept: tokio::task::AbortHandle,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TlsServer {
    pub async fn start(name: &'static str, issued: &Issued, alpn: &[&str]) -> TlsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&issued.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&issued.key).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let seen = counts.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let alpn = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned());
                    if tls
                        .write_all(format!("{name} {alpn}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsServer {
            addr,
            counts,
            accept: accept.abort_handle(),
        }
    }
}

/// A connection to `to` from loopback address `from` (any of 127.0.0.0/8).
pub async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let ip: IpAddr = from.parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// One line (without its newline), read byte by byte within 10 s; `None` if the stream
/// closed or failed first.
pub async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let read = async {
        let mut line = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(1) if byte[0] == b'\n' => return Some(String::from_utf8(line).unwrap()),
                Ok(1) => line.push(byte[0]),
                _ => return None,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no line within 10 s")
}

/// Which server a new connection to `addr` reaches (its first line).
pub async fn server_name(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    read_line(&mut stream).await.expect("closed before a name")
}

/// What a read gives within `limit`: bytes, end of stream, an error, or nothing yet.
#[derive(Debug, PartialEq)]
pub enum Read {
    Bytes(Vec<u8>),
    Eof,
    Error(std::io::ErrorKind),
    Nothing,
}

pub async fn read_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Read {
    let mut buf = vec![0u8; 64 * 1024];
    match tokio::time::timeout(limit, stream.read(&mut buf)).await {
        Err(_) => Read::Nothing,
        Ok(Ok(0)) => Read::Eof,
        Ok(Ok(n)) => Read::Bytes(buf[..n].to_vec()),
        Ok(Err(e)) => Read::Error(e.kind()),
    }
}

/// Reads until end of stream within `limit`, and what came; panics on an error or timeout.
pub async fn read_to_end<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut out))
        .await
        .expect("no end of stream in time")
        .expect("read failed");
    out
}

/// One line of TOML naming `servers` as an upstream's `servers = [...]`.
pub fn servers(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!("servers = [{}]", list.join(", "))
}
