//! The operator's dashboard against a live fleet: two gateway nodes with a
//! flash sale in force and reservations flowing, a real Prometheus (Debian's)
//! scraping them with the repository's alert rules and console pages, the
//! flash-sale page (`ops/prometheus/consoles/flash-sales.html`) rendered by
//! Prometheus and then by headless Chromium (its graphs drawn, a screenshot
//! taken), and every query of the Grafana dashboard
//! (`ops/grafana/flash-sales.json`) answered by the same Prometheus.

mod common;

use common::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A Prometheus of the test's own, scraping `targets` (host:port) every
/// second with the repository's rules and console pages.
struct Prometheus {
    base: String,
    _process: Process,
}

impl Prometheus {
    fn start(directory: &Path, targets: &[String]) -> Self {
        let root = testkit::repository_root();
        let port = free_port();
        let config = directory.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|target| format!("'{target}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [{}]\n",
                root.join("ops/prometheus/alerts.yml").display(),
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(directory.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                directory.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--web.console.templates={}",
                root.join("ops/prometheus/consoles").display()
            ))
            .arg(format!(
                "--web.console.libraries={}",
                root.join("ops/prometheus/console_libraries").display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus (Debian's `prometheus`; scripts/stack installs it)");
        let prometheus = Self {
            base: format!("http://127.0.0.1:{port}"),
            _process: Process(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while raw::status_of_get(&format!("{}/-/ready", prometheus.base)) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready: {}",
                log_tail(&directory.join("prometheus.log"))
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// `expr` evaluated now: the result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let reply: Value = client()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(reply["status"], "success", "{expr}: {reply}");
        reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Runs headless Chromium on `url` with `arguments` (`--dump-dom`,
/// `--screenshot=…`), giving the page's scripts 8 s of virtual time;
/// returns what it printed.
async fn chromium(profile: &Path, url: &str, arguments: &[String]) -> String {
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1280,1900",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(arguments)
        .arg(url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run chromium (Debian's `chromium`; scripts/stack installs it)");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the first `<td …>` after `label` in `page` (a figure row of
/// the console page).
fn figure_after<'a>(page: &'a str, label: &str) -> Option<&'a str> {
    let rest = &page[page.find(label)? + label.len()..];
    let cell = &rest[rest.find("<td")?..];
    let text = &cell[cell.find('>')? + 1..];
    Some(text[..text.find("</td>")?].trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flash_sale_dashboard_renders_live_figures_in_a_browser() {
    let (_fleet, a, b, sku, sale) = sale_with(100_000).await;

    // Checkouts on both nodes until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, sku) = (Arc::clone(&stop), sku.clone());
        let urls = [a.url("/v1/reservations"), b.url("/v1/reservations")];
        let run = testkit::unique_id("dash");
        tokio::spawn(async move {
            let body = reservation("m1", &sku, "dc1", 1);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let url = &urls[(sent % 2) as usize];
                let (status, answer) =
                    post(url, CHECKOUT, Some(&format!("{run}-{sent}")), &body).await;
                assert_eq!(status, 201, "{answer}");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };

    let directory = tempfile::tempdir().expect("temp dir");
    let hosts: Vec<String> = [&a, &b]
        .iter()
        .map(|node| node.base.trim_start_matches("http://").to_owned())
        .collect();
    let prometheus = Prometheus::start(directory.path(), &hosts);
    // The page reloads itself every 10 s: the browser gets 8 s of virtual
    // time to draw it.
    let page_url = format!("{}/consoles/flash-sales.html", prometheus.base);

    // Prometheus renders the figures: wait until the rates have two scrapes.
    let mut page;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = client().get(&page_url).send().await.expect("send");
        assert_eq!(response.status(), 200, "the console page renders");
        page = response.text().await.expect("text");
        let held = figure_after(&page, "reservations/s held").and_then(|f| f.parse::<f64>().ok());
        if held.is_some_and(|rate| rate > 0.0)
            && figure_after(&page, "p99 of a reservation, ms") != Some("–")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no live figures on the page:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        page.contains(&format!("<h2 class=\"sale\">{sale}</h2>")),
        "{page}"
    );
    let pool: i64 = figure_after(&page, "sellable in the pool")
        .and_then(|figure| figure.parse().ok())
        .unwrap_or_else(|| panic!("a pool figure:\n{page}"));
    assert!(pool > 0 && pool < 100_000, "pool {pool}");
    for node in ["node-a", "node-b"] {
        let free: i64 = figure_after(&page, &format!("free in {node}'s bucket"))
            .and_then(|figure| figure.parse().ok())
            .unwrap_or_else(|| panic!("{node}'s bucket on the page:\n{page}"));
        assert!(free >= 0, "{node}: {free}");
    }
    assert_eq!(
        figure_after(&page, "units held beyond the shelf"),
        Some("0")
    );
    assert_eq!(
        figure_after(&page, "refused while units remained, last 5 min"),
        Some("0")
    );
    assert!(
        page.contains("gateway nodes up: <span id=\"nodes-up\">2</span>"),
        "{page}"
    );

    // The browser: the page's graphs are drawn from the query API.
    let dom = chromium(
        &directory.path().join("chromium-dom"),
        &page_url,
        &["--dump-dom".to_owned()],
    )
    .await;
    for graph in [
        "sale-0-levels",
        "sale-0-outcomes",
        "fleet-outcomes",
        "fleet-p99",
    ] {
        let at = dom
            .find(&format!("id=\"{graph}\""))
            .unwrap_or_else(|| panic!("{graph} in the DOM:\n{dom}"));
        let drawn = &dom[at..];
        let next = drawn[1..]
            .find("class=\"graph\"")
            .map_or(drawn.len(), |end| end + 1);
        assert!(
            drawn[..next].contains("<svg"),
            "{graph} is drawn:\n{}",
            &drawn[..next]
        );
    }
    assert!(!dom.contains("Error loading data"), "{dom}");
    let screenshot = directory.path().join("dashboard.png");
    chromium(
        &directory.path().join("chromium-shot"),
        &page_url,
        &[format!("--screenshot={}", screenshot.display())],
    )
    .await;
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );

    // Every query of the Grafana dashboard, for this sale: valid, and
    // answered (the writer's series come from writers, not in this fleet).
    let grafana: Value = serde_json::from_str(
        &std::fs::read_to_string(testkit::repository_root().join("ops/grafana/flash-sales.json"))
            .expect("read the Grafana dashboard"),
    )
    .expect("the Grafana dashboard is JSON");
    let exprs: Vec<String> = grafana["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in exprs {
        let expr = expr.replace("$sale", &sale);
        let result = prometheus.query(&expr).await;
        assert!(
            !result.is_empty() || expr.contains("invgw_writer_"),
            "the Grafana query {expr} has no data"
        );
    }
    let variable = grafana["templating"]["list"][0]["query"]["query"]
        .as_str()
        .expect("the sale variable's query");
    assert_eq!(
        variable,
        "label_values(invgw_sale_pool_sellable_units, sale)"
    );
    let sales = prometheus
        .query("max by (sale) (invgw_sale_pool_sellable_units)")
        .await;
    assert!(
        sales
            .iter()
            .any(|series| series["metric"]["sale"] == json!(sale)),
        "{sales:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.expect("traffic");
    assert!(sent > 0);
}
