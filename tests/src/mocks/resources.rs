//! The resources (token audiences) a tenant knows, and the v2 scope ↔ resource mapping.

use super::util::is_guid;

/// Well-known first-party resources every tenant has, as App ID URIs.
const DEFAULT_RESOURCES: [&str; 5] = [
    "https://management.azure.com/",
    "https://management.core.windows.net/",
    "https://vault.azure.net",
    "https://storage.azure.com/",
    "https://graph.microsoft.com",
];

/// The allow-list of resources tokens can be issued for. A resource is known when it equals an
/// entry ignoring case and one trailing slash (Entra resolves App ID URIs that way), or is an
/// application id (a GUID).
#[derive(Debug, Clone)]
pub struct KnownResources {
    entries: Vec<String>,
}

impl Default for KnownResources {
    fn default() -> Self {
        Self {
            entries: DEFAULT_RESOURCES.iter().map(|r| r.to_string()).collect(),
        }
    }
}

impl KnownResources {
    /// An empty list: only GUID application ids are known.
    pub fn none() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    pub fn allow(&mut self, resource: &str) -> &mut Self {
        self.entries.push(resource.to_string());
        self
    }

    pub fn contains(&self, resource: &str) -> bool {
        let wanted = resource.trim_end_matches('/');
        is_guid(wanted)
            || self
                .entries
                .iter()
                .any(|e| e.trim_end_matches('/').eq_ignore_ascii_case(wanted))
    }
}

/// The resource of a client-credentials scope: the scope without its `/.default` suffix, kept
/// byte for byte (`https://management.azure.com//.default` → `https://management.azure.com/`).
pub fn resource_of_scope(scope: &str) -> Option<&str> {
    scope.strip_suffix("/.default").filter(|r| !r.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slash_is_kept_in_the_resource() {
        assert_eq!(
            resource_of_scope("https://management.azure.com//.default"),
            Some("https://management.azure.com/")
        );
        assert_eq!(
            resource_of_scope("https://management.azure.com/.default"),
            Some("https://management.azure.com")
        );
        assert_eq!(resource_of_scope("/.default"), None);
        assert_eq!(
            resource_of_scope("https://vault.azure.net/user_impersonation"),
            None
        );
    }

    #[test]
    fn known_resources_ignore_case_and_one_trailing_slash() {
        let mut known = KnownResources::default();
        assert!(known.contains("https://management.azure.com"));
        assert!(known.contains("HTTPS://VAULT.AZURE.NET/"));
        assert!(known.contains("3c1e9b5c-41f4-4b5e-9c35-3f43e7c1f0a2"));
        assert!(!known.contains("https://unknown.example"));
        known.allow("api://podid-test");
        assert!(known.contains("api://podid-test"));
        assert!(!KnownResources::none().contains("https://vault.azure.net"));
    }
}
