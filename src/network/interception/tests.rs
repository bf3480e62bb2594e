use super::*;

fn secrets() -> Vec<Secret> {
    vec![
        Secret::new("API_KEY".into(), vec!["api.test".into()], "real-api-key".into()).unwrap(),
        Secret::new("GH_TOKEN".into(), vec!["*.github.test".into()], "real-gh-token".into()).unwrap(),
    ]
}

fn rewrite(host: &str, secrets: &[Secret], pieces: &[&[u8]]) -> (Result<(), String>, Vec<u8>, Vec<Note>) {
    let mut rewriter = RequestRewriter::new(host, secrets);
    let (mut out, mut notes) = (Vec::new(), Vec::new());
    for piece in pieces {
        if let Err(e) = rewriter.feed(piece, &mut out, &mut notes) {
            return (Err(e), out, notes);
        }
    }
    (Ok(()), out, notes)
}

#[test]
fn a_hosts_placeholders_are_swapped_in_headers_and_basic_credentials_and_others_are_not() {
    let s = secrets();
    let (api, gh) = (&s[0].placeholder, &s[1].placeholder);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{api}"));
    let request = format!("POST /v1?k={gh} HTTP/1.1\r\nHost: API.test:443\r\nx-api-key: {api}\r\nAuthorization: Basic {basic}\r\nX-Other: {gh}\r\nContent-Length: 5\r\n\r\nhello");
    // Byte by byte: the head is whole before anything goes out.
    let pieces: Vec<&[u8]> = request.as_bytes().chunks(1).collect();
    let (result, out, notes) = rewrite("api.test", &s, &pieces);
    result.unwrap();
    let out = String::from_utf8(out).unwrap();
    let expected_basic = base64::engine::general_purpose::STANDARD.encode("x-access-token:real-api-key");
    assert_eq!(out, format!("POST /v1?k={gh} HTTP/1.1\r\nHost: API.test:443\r\nx-api-key: real-api-key\r\nAuthorization: Basic {expected_basic}\r\nX-Other: {gh}\r\nContent-Length: 5\r\n\r\nhello"));
    assert_eq!(
        notes,
        [
            Note::NotSwapped { secret: "GH_TOKEN".into(), place: "the request target (only headers are swapped)".into() },
            Note::Swapped { secret: "API_KEY".into(), place: "x-api-key".into() },
            Note::Swapped { secret: "API_KEY".into(), place: "Authorization".into() },
            Note::NotSwapped { secret: "GH_TOKEN".into(), place: "header X-Other".into() },
        ]
    );
}

#[test]
fn requests_are_framed_so_that_every_head_is_seen() {
    let s = secrets();
    let api = &s[0].placeholder;
    // A chunked body whose data looks like a head, a fixed body, then a second request:
    // only the real heads are rewritten.
    let fake = format!("GET / HTTP/1.1\r\nx-api-key: {api}\r\n\r\n");
    let request = format!(
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{fake}\r\n0\r\nX-Trailer: t\r\n\r\nPUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{fake}GET / HTTP/1.1\r\nx-api-key: {api}\r\n\r\n",
        fake.len(),
        fake.len()
    );
    for split in [1, 7, request.len()] {
        let pieces: Vec<&[u8]> = request.as_bytes().chunks(split).collect();
        let (result, out, notes) = rewrite("api.test", &s, &pieces);
        result.unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches(api.as_str()).count(), 2, "body data stays as it was: {out}");
        assert!(out.ends_with("GET / HTTP/1.1\r\nx-api-key: real-api-key\r\n\r\n"), "{out}");
        assert_eq!(notes.len(), 1);
    }
    // After an upgrade, bytes pass as they are.
    let (result, out, _) = rewrite("api.test", &s, &[format!("GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n\x01\x05{api}").as_bytes()]);
    result.unwrap();
    assert!(contains(&out, api.as_bytes()));
}

#[test]
fn bodies_are_swapped_only_for_secrets_that_ask_and_only_when_they_can_be_held() {
    let mut s = secrets();
    s[0].body = true;
    let (api, gh) = (s[0].placeholder.clone(), s[1].placeholder.clone());
    let body = format!("{{\"key\":\"{api}\",\"again\":\"{api}\",\"gh\":\"{gh}\"}}");
    let request = format!("POST /v1 HTTP/1.1\r\nContent-Length: {}\r\nHost: api.test\r\n\r\n{body}GET /next HTTP/1.1\r\n\r\n", body.len());
    let pieces: Vec<&[u8]> = request.as_bytes().chunks(3).collect();
    let (result, out, notes) = rewrite("api.test", &s, &pieces);
    result.unwrap();
    let swapped = format!("{{\"key\":\"real-api-key\",\"again\":\"real-api-key\",\"gh\":\"{gh}\"}}");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("POST /v1 HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{swapped}GET /next HTTP/1.1\r\n\r\n", swapped.len())
    );
    assert_eq!(
        notes,
        [
            Note::Swapped { secret: "API_KEY".into(), place: "the body".into() },
            Note::NotSwapped { secret: "GH_TOKEN".into(), place: "the body".into() }
        ]
    );
    // Not held: a client waiting for 100 Continue, a body over the limit, a chunked body,
    // another host.
    let waiting = format!("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let large = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{api}", MAX_SWAP_BODY + 1);
    let chunked = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{api}\r\n0\r\n\r\n", api.len());
    for (host, request) in [("api.test", &waiting), ("api.test", &large), ("api.test", &chunked), ("x.github.test", &waiting)] {
        let (result, out, _) = rewrite(host, &s, &[request.as_bytes()]);
        result.unwrap();
        assert!(contains(&out, api.as_bytes()) && !contains(&out, b"real-api-key"), "{host}: {}", String::from_utf8_lossy(&out));
    }
}

#[test]
fn hostile_requests_are_refused() {
    let s = secrets();
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
        b"GET / HTTP/1.1\nHost: api.test\n\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
    ] {
        let (result, out, _) = rewrite("api.test", &s, &[bad]);
        assert!(result.is_err(), "{:?} gave {:?}", String::from_utf8_lossy(bad), String::from_utf8_lossy(&out));
    }
    let endless = vec![b'a'; MAX_HEAD + 1];
    assert!(rewrite("api.test", &s, &[b"GET / HTTP/1.1\r\nX: ", &endless]).0.is_err(), "a head is bounded");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any bytes, in any pieces: an answer, never a panic; and a value leaves only in a
    /// head rewritten for its own host.
    #[test]
    fn any_request_stream_is_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), split in 1usize..64) {
        let s = secrets();
        let pieces: Vec<&[u8]> = bytes.chunks(split).collect();
        let (_, out, _) = rewrite("other.test", &s, &pieces);
        proptest::prop_assert!(!contains(&out, b"real-api-key") && !contains(&out, b"real-gh-token"));
    }

    #[test]
    fn built_requests_swap_exactly_their_hosts_placeholders(
        headers in proptest::collection::vec((0usize..3, "[A-Za-z-]{1,12}", "[ -~]{0,16}", 0usize..3), 0..6),
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
    ) {
        let s = secrets();
        let mut head = String::from("POST /p HTTP/1.1\r\n");
        for (kind, name, value, which) in &headers {
            let placeholder = if *which < 2 { s[*which].placeholder.as_str() } else { "" };
            let name = match kind { 0 => "Authorization".to_string(), 1 => "X-Api-Key".to_string(), _ => format!("X-{name}") };
            head += &format!("{name}: {value}{placeholder}\r\n");
        }
        head += &format!("Content-Length: {}\r\n\r\n", body.len());
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        let (result, out, notes) = rewrite("x.github.test", &s, &[&request]);
        proptest::prop_assert!(result.is_ok(), "{:?}", result);
        // Swapped in credential headers only; elsewhere the placeholder goes as it is.
        let swapped = headers.iter().filter(|(kind, _, _, w)| *w == 1 && *kind < 2).count();
        let kept = headers.iter().filter(|(kind, _, _, w)| *w == 1 && *kind == 2).count();
        proptest::prop_assert_eq!(notes.iter().filter(|n| matches!(n, Note::Swapped { .. })).count(), swapped);
        proptest::prop_assert_eq!(contains(&out, s[1].placeholder.as_bytes()), kept > 0);
        proptest::prop_assert!(!contains(&out, b"real-api-key"));
        proptest::prop_assert!(out.ends_with(&body));
    }
}

#[test]
fn a_secret_goes_only_in_credential_headers_and_those_it_names() {
    let mut s = secrets();
    let api = s[0].placeholder.clone();
    // The reflection attack: a server that echoes Origin would hand the value back.
    let request = format!("GET / HTTP/1.1\r\nHost: api.test\r\nOrigin: https://{api}\r\nReferer: {api}\r\nX-Token: {api}\r\nProxy-Authorization: Bearer {api}\r\n\r\n");
    let (result, out, notes) = rewrite("api.test", &s, &[request.as_bytes()]);
    result.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains(&format!("Origin: https://{api}\r\n"))
            && out.contains(&format!("Referer: {api}\r\n"))
            && out.contains(&format!("X-Token: {api}\r\n")),
        "{out}"
    );
    assert!(out.contains("Proxy-Authorization: Bearer real-api-key\r\n"), "{out}");
    assert!(
        notes.contains(&Note::NotSwapped {
            secret: "API_KEY".into(),
            place: "header Origin (not a credential header, nor one its config names)".into()
        }),
        "{notes:?}"
    );
    s[0].headers = vec!["x-token".into()];
    let (result, out, _) = rewrite("api.test", &s, &[request.as_bytes()]);
    result.unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("X-Token: real-api-key\r\n") && out.contains(&format!("Origin: https://{api}\r\n")),
        "a header its config names: {out}"
    );
}

#[test]
fn an_absolute_form_target_may_name_only_the_intercepted_host() {
    let s = secrets();
    let api = &s[0].placeholder;
    for target in
        ["https://evil.test/x", "http://evil.test:443/", "https://evil.test", "https://user@api.test/", "https://api.test.evil.test/"]
    {
        let request = format!("GET {target} HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {api}\r\n\r\n");
        let (result, out, _) = rewrite("api.test", &s, &[request.as_bytes()]);
        assert!(result.is_err() && !contains(&out, b"real-api-key"), "{target}: {}", String::from_utf8_lossy(&out));
    }
    let request = format!("GET https://API.test/x HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {api}\r\n\r\n");
    let (result, out, _) = rewrite("api.test", &s, &[request.as_bytes()]);
    result.unwrap();
    assert!(contains(&out, b"Bearer real-api-key"), "its own host in absolute form");
}
