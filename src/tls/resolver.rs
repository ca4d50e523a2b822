//! Choosing a certificate per client by SNI (being written).
// TEMPORARY STUB until helper-certs merges.
use super::certs::Loaded;
use std::sync::Arc;
pub struct CertStore(Vec<Arc<Loaded>>);
impl CertStore {
    pub fn new(certs: Vec<Arc<Loaded>>) -> CertStore {
        CertStore(certs)
    }
}
#[derive(Debug)]
pub struct Resolver(std::sync::Mutex<Option<Arc<rustls::sign::CertifiedKey>>>);
impl Resolver {
    pub fn new(store: CertStore) -> Resolver {
        Resolver(std::sync::Mutex::new(Some(store.0[0].key.clone())))
    }
    pub fn replace(&self, store: CertStore) {
        *self.0.lock().unwrap() = Some(store.0[0].key.clone())
    }
}
impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.lock().unwrap().clone()
    }
}
