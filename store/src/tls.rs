//! TLS to etcd: `https://` endpoints, verified against a CA, with a client certificate for
//! etcd's client-certificate authentication (`--client-cert-auth`).

use super::StoreError;
use etcd_client::{Certificate, Identity, TlsOptions};
use std::path::PathBuf;

/// PEM files for TLS to etcd; all unset for plain `http://` endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA etcd's certificate chains to.
    pub ca: Option<PathBuf>,
    /// The certificate this server presents to etcd.
    pub cert: Option<PathBuf>,
    /// The key of `cert`.
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    /// Checks the files against the endpoints: https endpoints need the CA, http ones take no
    /// TLS files, and a certificate needs its key. The error names the setting.
    pub fn check(&self, endpoints: &[String]) -> Result<(), (&'static str, String)> {
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < endpoints.len() {
            return Err((
                "etcd",
                "mixes http:// and https:// endpoints: use one scheme".into(),
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err((
                "etcd_cert",
                "and etcd_key go together: give both or neither".into(),
            ));
        }
        if https > 0 && self.ca.is_none() {
            return Err((
                "etcd_ca",
                "is needed for https:// etcd endpoints: the CA etcd's certificate chains to".into(),
            ));
        }
        if https == 0 && (self.ca.is_some() || self.cert.is_some()) {
            return Err((
                "etcd_ca",
                "TLS files are given but the etcd endpoints are http://: use https:// URLs".into(),
            ));
        }
        Ok(())
    }

    /// The client's TLS options, reading the files; `None` without TLS.
    pub(super) fn options(&self) -> Result<Option<TlsOptions>, StoreError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| StoreError::Tls(format!("{}: {e}", path.display())))
        };
        let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Some(options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_do_not_fit_the_endpoints_are_named() {
        let https = vec!["https://etcd:2379".to_string()];
        let http = vec!["http://etcd:2379".to_string()];
        let ca = Some(PathBuf::from("ca.pem"));
        let none = EtcdTls::default();
        assert_eq!(none.check(&http), Ok(()));
        assert_eq!(none.check(&https).unwrap_err().0, "etcd_ca");
        let with_ca = EtcdTls {
            ca: ca.clone(),
            ..EtcdTls::default()
        };
        assert_eq!(with_ca.check(&https), Ok(()));
        assert_eq!(with_ca.check(&http).unwrap_err().0, "etcd_ca");
        let half = EtcdTls {
            ca,
            cert: Some("c.pem".into()),
            key: None,
        };
        assert_eq!(half.check(&https).unwrap_err().0, "etcd_cert");
        let mixed = vec![https[0].clone(), http[0].clone()];
        assert_eq!(with_ca.check(&mixed).unwrap_err().0, "etcd");
    }
}
