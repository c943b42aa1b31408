//! The kubeconfig that points a client at the fake server: one cluster, one context, one user
//! with no credentials (the server does no authentication).

/// A kubeconfig for `server` (`http://127.0.0.1:<port>`), current context `fake`.
pub fn render(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
preferences: {{}}
"
    )
}
