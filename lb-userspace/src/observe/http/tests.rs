//! The answers every server shares, and the server loop on real sockets
//! (inside a private network namespace, see `test_support`).

use super::*;
use crate::observe::test_support::{
    assert_refused, connect, in_private_netns, is_closed, read_response, request, request_raw,
    runtime,
};

use std::time::Instant;

#[test]
fn plain_json_and_not_found_carry_go_headers() {
    let (status, headers, body) = read_response(plain(StatusCode::OK, "ebpf"));
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ebpf"));
    assert_eq!(headers[CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");

    let (status, headers, body) = read_response(json(
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"a": 1}"#.to_string(),
    ));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, r#"{"a": 1}"#);
    assert_eq!(headers[CONTENT_TYPE], "application/json");
    assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");

    let (status, headers, body) = read_response(not_found());
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "404 page not found\n");
    assert_eq!(headers[CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");

    // Only what the caller asks for.
    let (_, headers, _) = read_response(response(StatusCode::OK, "text/x", "x"));
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers[CONTENT_TYPE], "text/x");
}

#[test]
fn serve_answers_any_method_limits_connections_and_closes_on_drop_in_netns() {
    in_private_netns(
        "serve_answers_any_method_limits_connections_and_closes_on_drop_in_netns",
        || {
            const PORT: u16 = 8080;
            let rt = runtime();
            let listener = rt
                .block_on(TcpListener::bind(("127.0.0.1", PORT)))
                .expect("bind");
            let handler: Handler = Arc::new(|req: &Request<()>| {
                json(StatusCode::OK, format!("{} {}", req.method(), req.uri()))
            });
            let server = rt.spawn(serve_limited(listener, "test", handler, 2));

            // The handler sees method and URI; a request body is not its
            // business and does not break the connection.
            let mut a = connect(PORT).expect("connect a");
            assert_eq!(request(&mut a, "/x?y=1").body, "GET /x?y=1");
            let answer = request_raw(
                &mut a,
                "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
            );
            assert_eq!((answer.status, answer.body.as_str()), (200, "POST /p"));
            assert_eq!(request(&mut a, "/again").body, "GET /again");

            // Two connections open: a third is closed without an answer,
            // the open ones keep working.
            let mut b = connect(PORT).expect("connect b");
            assert_eq!(request(&mut b, "/").status, 200);
            let mut c = connect(PORT).expect("connect c");
            assert!(
                is_closed(&mut c),
                "connection over the limit must be closed"
            );
            assert_eq!(request(&mut a, "/").status, 200);

            // A closed connection frees its slot.
            drop(a);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut d = connect(PORT).expect("connect d");
                if !is_closed(&mut d) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "slot of a closed connection not freed"
                );
                std::thread::sleep(Duration::from_millis(20));
            }

            // Dropping the serving future closes the listener and the open
            // connections.
            server.abort();
            let _ = rt.block_on(server);
            assert!(is_closed(&mut b), "open connection must be closed");
            assert_refused(PORT);
        },
    );
}
