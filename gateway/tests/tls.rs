//! TLS on the listener (rustls) when a certificate and key are configured.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_when_a_certificate_is_configured() {
    let fleet = Fleet::on_stack("");
    let directory = fleet.directory.path();
    let (cert, key) = (directory.join("cert.pem"), directory.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed with the Debian base system");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let text = fleet.config_text().replace(
        "threads = 2\n",
        &format!(
            "threads = 2\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    fleet.write_config(&text);

    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&fleet.config)
        .env("INVGW_LISTEN_HTTP", format!("127.0.0.1:{port}"))
        .env("INVGW_REDIS_URL", &fleet.redis_url)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start gateway");
    let _gateway = Process(child);
    wait_for_port(port);

    let mut last = String::new();
    for _ in 0..50 {
        let output = Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "2",
                &format!("https://127.0.0.1:{port}/health"),
            ])
            .output()
            .expect("curl");
        last = String::from_utf8_lossy(&output.stdout).into_owned();
        if last.contains("\"status\":\"ok\"") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        last.contains("\"status\":\"ok\""),
        "https /health answered: {last:?}"
    );
    let plain = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/health"),
        ])
        .output()
        .expect("curl");
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("\"status\":\"ok\""),
        "plain HTTP is not served"
    );
}
