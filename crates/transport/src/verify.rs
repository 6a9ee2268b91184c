//! Certificate verification by pinned node ID: no certificate authorities, no names. A peer is
//! accepted when the public key in its certificate hashes to an ID the configuration lists, and
//! it proves possession of the key with a TLS 1.3 signature.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::identity::NodeId;
use crate::validity::{Seconds, Standing, Validity};

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn id_of(cert: &CertificateDer<'_>) -> Result<NodeId, Error> {
    NodeId::of_certificate(cert)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Refuses a certificate outside its validity period, even with a pinned key.
fn check_dates(
    cert: &CertificateDer<'_>,
    now: UnixTime,
    role: &str,
    id: NodeId,
) -> Result<(), Error> {
    let validity = Validity::of_certificate(cert)
        .ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = Seconds(now.as_secs() as i64);
    match validity.standing(now) {
        Standing::Valid => Ok(()),
        Standing::Expired(at) => {
            tracing::warn!(peer = %id, expired = %at, "refusing {role}: its certificate has expired (run `syncd init` with a new state directory there and update the pinned ID)");
            Err(Error::InvalidCertificate(CertificateError::Expired))
        }
        Standing::NotYetValid(from) => {
            tracing::warn!(peer = %id, valid_from = %from, "refusing {role}: its certificate is not valid yet (is its clock or ours wrong?)");
            Err(Error::InvalidCertificate(CertificateError::NotValidYet))
        }
    }
}

/// The agent's check of the manager: exactly one ID is acceptable.
#[derive(Debug)]
pub(crate) struct PinnedServer {
    pub(crate) expected: NodeId,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = id_of(end_entity)?;
        if id == self.expected {
            check_dates(end_entity, now, "manager", id)?;
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(peer = %id, expected = %self.expected, "refusing manager: its node ID is not the configured manager_id");
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // QUIC is TLS 1.3 only.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The manager's check of agents: any ID in the configured set.
#[derive(Debug)]
pub(crate) struct PinnedClients {
    pub(crate) allowed: Arc<HashMap<NodeId, String>>,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = id_of(end_entity)?;
        if self.allowed.contains_key(&id) {
            check_dates(end_entity, now, "agent", id)?;
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(peer = %id, "refusing agent: its node ID is not in [[manager.agents]]");
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
