//! The JSON configuration of `mock-azure` (both mocks as one process, for end-to-end runs and
//! the local demo), and starting the mocks it describes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::entra::{self, App, EntraError, EntraMock, FederatedCredential, Tenant};
use super::imds::{ImdsMock, InstanceMetadata, ManagedIdentity};
use super::resources::KnownResources;
use super::server::StartError;
use super::tls::{self, TestCa, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("apps[{client_id}].certificates: {path}: {reason}")]
    Certificate {
        client_id: String,
        path: PathBuf,
        reason: String,
    },
    #[error("entra: {0}")]
    Entra(#[from] EntraError),
    #[error("imds: {0}")]
    Imds(#[from] StartError),
    #[error("the CA: {0}")]
    Ca(#[from] TlsError),
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn default_host() -> String {
    entra::DEFAULT_HOST.to_string()
}

/// `{"entra": {...}, "imds": {...}}`; either may be left out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockAzureConfig {
    pub entra: Option<EntraConfig>,
    pub imds: Option<ImdsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// Default `127.0.0.1:0`.
    #[serde(default = "loopback")]
    pub listen: SocketAddr,
    /// Default `login.mock.test`.
    #[serde(default = "default_host")]
    pub host: String,
    pub token_lifetime_seconds: Option<u64>,
    /// Resources beyond the well-known ones.
    #[serde(default)]
    pub resources: Vec<String>,
    /// Tenants with domain names; tenants named only by apps need no entry.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    #[serde(default)]
    pub domains: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub tenant: String,
    pub client_id: String,
    /// The service principal's object id; random when left out.
    pub object_id: Option<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Certificate files, PEM or DER, relative to the configuration file.
    #[serde(default)]
    pub certificates: Vec<PathBuf>,
    #[serde(default)]
    pub federated: Vec<FederatedConfig>,
    pub token_lifetime_seconds: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedConfig {
    pub issuer: String,
    pub subject: String,
    /// Default `api://AzureADTokenExchange`.
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImdsConfig {
    /// Default `127.0.0.1:0`.
    #[serde(default = "loopback")]
    pub listen: SocketAddr,
    /// The tenant of the identities; random when left out.
    pub tenant: Option<String>,
    pub token_lifetime_seconds: Option<u64>,
    pub system_identity: Option<ManagedIdentity>,
    #[serde(default)]
    pub identities: Vec<ManagedIdentity>,
    pub instance: Option<InstanceMetadata>,
    #[serde(default)]
    pub resources: Vec<String>,
    /// Default true.
    pub cache_tokens: Option<bool>,
}

/// The mocks a configuration started.
#[derive(Debug)]
pub struct MockAzure {
    pub entra: Option<EntraMock>,
    pub imds: Option<ImdsMock>,
}

impl MockAzure {
    pub async fn shutdown(self) {
        if let Some(entra) = self.entra {
            entra.shutdown().await;
        }
        if let Some(imds) = self.imds {
            imds.shutdown().await;
        }
    }
}

fn resources(extra: &[String]) -> KnownResources {
    let mut known = KnownResources::default();
    for r in extra {
        known.allow(r);
    }
    known
}

impl MockAzureConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Starts what is configured on the current runtime; `base` resolves relative file names.
    /// The Entra server certificate is signed by `ca`.
    pub async fn start(&self, base: &Path, ca: Arc<TestCa>) -> Result<MockAzure, ConfigError> {
        let entra = match &self.entra {
            Some(config) => Some(config.start(base, ca).await?),
            None => None,
        };
        let imds = match &self.imds {
            Some(config) => Some(config.start().await?),
            None => None,
        };
        Ok(MockAzure { entra, imds })
    }
}

impl AppConfig {
    fn app(&self, base: &Path) -> Result<App, ConfigError> {
        let mut app = App::new(&self.tenant, &self.client_id);
        if let Some(oid) = &self.object_id {
            app = app.object_id(oid);
        }
        for secret in &self.secrets {
            app = app.secret(secret);
        }
        for file in &self.certificates {
            let path = base.join(file);
            let bad = |reason: String| ConfigError::Certificate {
                client_id: self.client_id.clone(),
                path: path.clone(),
                reason,
            };
            let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
            let der = tls::certificate_der(&bytes).map_err(|e| bad(e.to_string()))?;
            app = app.certificate(&der);
        }
        for f in &self.federated {
            let mut credential = FederatedCredential::new(&f.issuer, &f.subject);
            if let Some(audience) = &f.audience {
                credential = credential.audience(audience);
            }
            app = app.federated(credential);
        }
        if let Some(seconds) = self.token_lifetime_seconds {
            app = app.token_lifetime(Duration::from_secs(seconds));
        }
        Ok(app)
    }
}

impl EntraConfig {
    async fn start(&self, base: &Path, ca: Arc<TestCa>) -> Result<EntraMock, ConfigError> {
        let mut builder = EntraMock::builder()
            .host(&self.host)
            .ca(ca)
            .resources(resources(&self.resources));
        if let Some(seconds) = self.token_lifetime_seconds {
            builder = builder.token_lifetime(Duration::from_secs(seconds));
        }
        for t in &self.tenants {
            let mut tenant = Tenant::new(&t.id);
            for d in &t.domains {
                tenant = tenant.domain(d);
            }
            builder = builder.tenant(tenant);
        }
        for app in &self.apps {
            builder = builder.app(app.app(base)?);
        }
        let listener = std::net::TcpListener::bind(self.listen).map_err(|source| {
            EntraError::Start(StartError::Bind {
                addr: self.listen,
                source,
            })
        })?;
        Ok(builder.start_on(listener).await?)
    }
}

impl ImdsConfig {
    async fn start(&self) -> Result<ImdsMock, ConfigError> {
        let mut builder = ImdsMock::builder().resources(resources(&self.resources));
        if let Some(tenant) = &self.tenant {
            builder = builder.tenant(tenant);
        }
        if let Some(seconds) = self.token_lifetime_seconds {
            builder = builder.token_lifetime(Duration::from_secs(seconds));
        }
        if let Some(identity) = &self.system_identity {
            builder = builder.system_identity(identity.clone());
        }
        for identity in &self.identities {
            builder = builder.attach(identity.clone());
        }
        if let Some(instance) = &self.instance {
            builder = builder.instance(instance.clone());
        }
        if let Some(cache) = self.cache_tokens {
            builder = builder.cache_tokens(cache);
        }
        let listener =
            std::net::TcpListener::bind(self.listen).map_err(|source| StartError::Bind {
                addr: self.listen,
                source,
            })?;
        Ok(builder.start_on(listener).await?)
    }
}
