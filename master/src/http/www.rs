//! Buildbot's web UI at `/`: the files of an installed `buildbot-www` package (and of its view
//! plugins) served as they are, with the frontend configuration injected into `index.html` as
//! Buildbot's master does; without the package, a small page saying how to install it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tower_http::services::ServeDir;

use super::login::Sessions;

/// Where `index.html` leaves room for the frontend configuration.
const CONFIG_PLACEHOLDER: &str = "<!-- BUILDBOT_CONFIG_PLACEHOLDER -->";

/// An installed UI: its static files and the view plugins found beside it.
#[derive(Debug, Clone)]
pub struct Ui {
    pub static_dir: PathBuf,
    index: String,
    /// Plugin name (`waterfall_view`) and its static directory.
    pub plugins: Vec<(String, PathBuf)>,
}

impl Ui {
    /// The UI in `dir` — a `static` directory, or a `buildbot_www` package holding one — with the
    /// plugins installed next to the package.
    pub fn open(dir: &Path) -> Result<Ui, String> {
        let static_dir = if dir.join("index.html").is_file() { dir.to_owned() } else { dir.join("static") };
        let index = std::fs::read_to_string(static_dir.join("index.html"))
            .map_err(|e| format!("{}: not a buildbot-www static directory: {e}", static_dir.display()))?;
        let packages = static_dir.parent().and_then(Path::parent).map(Path::to_owned);
        let mut plugins = Vec::new();
        for name in ["waterfall_view", "console_view", "grid_view"] {
            if let Some(site) = &packages {
                let plugin = site.join(format!("buildbot_{name}")).join("static");
                if plugin.is_dir() {
                    plugins.push((name.to_owned(), plugin));
                }
            }
        }
        Ok(Ui { static_dir, index, plugins })
    }

    /// Finds `buildbot-www` where pip installs it: the active virtualenv, the user's site, the
    /// system's site- and dist-packages — after `/usr/share/kiln/www`, where the master image
    /// puts it.
    pub fn discover() -> Option<Ui> {
        let mut patterns = vec!["/usr/share/kiln/www/buildbot_www".to_owned()];
        if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
            patterns.push(format!("{}/lib/python3*/site-packages/buildbot_www", Path::new(&venv).display()));
        }
        if let Some(home) = std::env::var_os("HOME") {
            patterns.push(format!("{}/.local/lib/python3*/site-packages/buildbot_www", Path::new(&home).display()));
        }
        for prefix in ["/usr/local/lib", "/usr/lib", "/opt/venv/lib"] {
            patterns.push(format!("{prefix}/python3*/site-packages/buildbot_www"));
            patterns.push(format!("{prefix}/python3*/dist-packages/buildbot_www"));
        }
        patterns.iter().filter_map(|p| glob::glob(p).ok()).flatten().flatten().find_map(|dir| Ui::open(&dir).ok())
    }

    /// `index.html` with the frontend configuration in place of its placeholder.
    pub fn index(&self, config: &Value) -> String {
        let script = format!("<script id=\"bb-config\">\n    window.buildbotFrontendConfig = {config};\n</script>");
        self.index.replacen(CONFIG_PLACEHOLDER, &script, 1)
    }
}

/// What the UI reads before anything else (Buildbot's `/config` and the injected copy): the
/// title, the master's URL as the browser reaches it, how to log in and who is logged in
/// (`login`: Buildbot's `auth` and `user`), no avatars, the plugins found.
pub fn frontend_config(title: &str, base_url: &str, plugins: &[(String, PathBuf)], login: (Value, Value)) -> Value {
    let plugins: serde_json::Map<String, Value> = plugins.iter().map(|(name, _)| (name.clone(), json!({}))).collect();
    let (auth, user) = login;
    json!({
        "title": title,
        "titleURL": base_url,
        "buildbotURL": base_url,
        "multiMaster": false,
        "user": user,
        "auth": auth,
        "avatar_methods": [],
        "plugins": plugins,
        "ui_default_config": {},
        "versions": [["Kiln", env!("CARGO_PKG_VERSION")]],
    })
}

/// The base URL the browser used, from the request's `Host`.
fn base_url(headers: &HeaderMap, https: bool) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1:8010");
    format!("{}://{host}/", if https { "https" } else { "http" })
}

/// The page `/` shows when no UI is installed.
const NO_UI: &str = r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 2em auto">
<h1>Kiln</h1>
<p>This master serves Buildbot's web UI when it is installed:</p>
<pre>pip install buildbot-www==4.3.0 buildbot-waterfall-view==4.3.0 buildbot-console-view==4.3.0 buildbot-grid-view==4.3.0</pre>
<p>then restart the master (or name the package's <code>static</code> directory in <code>http.www</code>).</p>
<ul>
<li><a href="api/v2">/api/v2</a> — Buildbot's REST data API</li>
<li><a href="metrics">/metrics</a> — Prometheus metrics</li>
<li><code>kiln --help</code> — the command line: builders, queue, workers, force, logs</li>
</ul>
</body></html>
"#;

/// What `/avatar?email=…` answers for everyone: the UI shows an avatar beside every change and
/// author, and Kiln looks up no pictures (the configuration lists no avatar methods).
const AVATAR: ([(header::HeaderName, &str); 2], &str) = (
    [(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "public,max-age=86400")],
    r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="16" cy="16" r="16" fill="#c8ccd0"/><circle cx="16" cy="12" r="6" fill="#f4f5f6"/><path d="M5 27c2-6 6-8 11-8s9 2 11 8" fill="#f4f5f6"/></svg>"##,
);

/// The routes of the UI, to merge below the API's: `/`, `/config`, `/avatar`, `/plugins/<name>/…`, and the
/// UI's own files for any other path.
pub fn routes<S: Clone + Send + Sync + 'static>(
    ui: Option<Ui>,
    title: String,
    https: bool,
    sessions: Arc<Sessions>,
) -> Router<S> {
    let title = Arc::new(title);
    let plugins = Arc::new(ui.as_ref().map(|ui| ui.plugins.clone()).unwrap_or_default());
    let config = {
        let (title, sessions) = (title.clone(), sessions.clone());
        move |headers: HeaderMap| {
            let (plugins, title, sessions) = (plugins.clone(), title.clone(), sessions.clone());
            async move {
                let login = sessions.frontend(&headers);
                let config = frontend_config(&title, &base_url(&headers, https), &plugins, login);
                ([(header::CACHE_CONTROL, "no-store")], axum::Json(config)).into_response()
            }
        }
    };
    let Some(ui) = ui else {
        return Router::new().route("/", get(|| async { Html(NO_UI) })).route("/config", get(config));
    };
    let ui = Arc::new(ui);
    let index = {
        let ui = ui.clone();
        move |headers: HeaderMap| {
            let (ui, title, sessions) = (ui.clone(), title.clone(), sessions.clone());
            async move {
                let login = sessions.frontend(&headers);
                let config = frontend_config(&title, &base_url(&headers, https), &ui.plugins, login);
                let page: Response = Html(ui.index(&config)).into_response();
                ([(header::CACHE_CONTROL, "no-store")], page).into_response()
            }
        }
    };
    let mut router = Router::new()
        .route("/", get(index.clone()))
        .route("/index.html", get(index))
        .route("/config", get(config))
        .route("/avatar", get(|| async { AVATAR }));
    for (name, dir) in &ui.plugins {
        // The UI links every plugin's `styles.css`; a plugin that ships none (the grid view) gets
        // an empty sheet instead of a 404 in the browser's console.
        if !dir.join("styles.css").is_file() {
            let empty = ([(header::CONTENT_TYPE, "text/css")], "");
            router = router.route(&format!("/plugins/{name}/styles.css"), get(move || async move { empty }));
        }
        router = router.nest_service(&format!("/plugins/{name}"), ServeDir::new(dir));
    }
    router.fallback_service(ServeDir::new(&ui.static_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_takes_the_placeholders_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("buildbot_www/static")).unwrap();
        std::fs::write(dir.path().join("buildbot_www/static/index.html"), format!("<html>{CONFIG_PLACEHOLDER}</html>"))
            .unwrap();
        std::fs::create_dir_all(dir.path().join("buildbot_grid_view/static")).unwrap();
        let ui = Ui::open(&dir.path().join("buildbot_www")).unwrap();
        assert_eq!(ui.plugins.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["grid_view"]);
        let login = Sessions::new(vec![0; 32], &[], false).frontend(&HeaderMap::new());
        let config = frontend_config("CI", "http://ci.example.org/", &ui.plugins, login);
        let page = ui.index(&config);
        assert!(page.starts_with("<html><script id=\"bb-config\">"), "{page}");
        assert!(page.contains("window.buildbotFrontendConfig = {") && !page.contains(CONFIG_PLACEHOLDER), "{page}");
        assert_eq!(config["plugins"], json!({ "grid_view": {} }));
        assert_eq!(config["buildbotURL"], "http://ci.example.org/");
        assert!(Ui::open(dir.path()).unwrap_err().contains("not a buildbot-www static directory"));
    }
}
