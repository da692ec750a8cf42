//! The browser UI's server side, through the real binary: pages rendered on the server with their hydration
//! script, the site folder's files, and unknown paths answered as a page for browsers and as JSON otherwise.
//! (The UI itself is tested in a browser by end2end/, docs/ui.md.)

mod common;

use common::{curl, error_code, Binary};

#[test]
fn pages_render_on_the_server_and_static_files_come_from_the_site_folder() {
    let data = tempfile::tempdir().unwrap();
    let site = tempfile::tempdir().unwrap();
    std::fs::create_dir(site.path().join("pkg")).unwrap();
    std::fs::write(site.path().join("pkg/studio.css"), "body {}").unwrap();
    std::fs::write(site.path().join("favicon.svg"), "<svg/>").unwrap();
    let s = Binary::start(
        data.path(),
        &[
            "--preset",
            "flux-tiny",
            "--site-dir",
            site.path().to_str().unwrap(),
        ],
    );

    let (status, page) = curl(&[&format!("{}/", s.url)]);
    assert_eq!(status, 200);
    assert!(page.starts_with("<!DOCTYPE html>"), "{page:.200}");
    assert!(page.contains("FLUX studio</title>"), "{page}");
    assert!(page.contains("/pkg/frontend.js") && page.contains("/pkg/frontend_bg.wasm"));
    assert!(page.contains(r#"href="/favicon.svg""#) && page.contains("/pkg/studio.css"));
    assert!(page.contains(r#"data-hydrated="false""#));
    for (path, text) in [
        ("/studio/train", "Train a LoRA"),
        ("/studio/train/", "Train a LoRA"),
        ("/studio/gallery", "Gallery"),
        ("/studio/jobs", "Jobs"),
        (
            "/studio/train/3f2a0d7e-8c1b-4d7a-9c55-0123456789ab",
            "Loading the run",
        ),
    ] {
        let (status, page) = curl(&[&format!("{}{path}", s.url)]);
        assert_eq!(status, 200, "{path}");
        assert!(page.contains(text), "{path}: {page}");
    }

    assert_eq!(
        curl(&[&format!("{}/pkg/studio.css", s.url)]),
        (200, "body {}".into())
    );
    assert_eq!(
        curl(&[&format!("{}/favicon.svg", s.url)]),
        (200, "<svg/>".into())
    );
    assert_eq!(curl(&[&format!("{}/pkg/frontend.js", s.url)]).0, 404);

    // Unknown paths: a page for browsers, the API's JSON for everyone else.
    let (status, page) = curl(&["-H", "Accept: text/html", &format!("{}/studio/nope", s.url)]);
    assert_eq!(status, 404);
    assert!(page.contains("No such page"), "{page}");
    let (status, body) = curl(&[&format!("{}/studio/nope", s.url)]);
    assert_eq!((status, error_code(&body)), (404, "not_found".into()));
    // The API's own paths are untouched by the pages.
    let (status, body) = curl(&["-H", "Accept: text/html", &format!("{}/train/", s.url)]);
    assert_eq!(
        (status, error_code(&body)),
        (405, "method_not_allowed".into())
    );
}
