//! Chat templates rendered by `lorax-router --chat-template-worker` processes (this crate's binary): the
//! same prompts as in-process rendering, the template's own errors passed on, and templates that take
//! more memory than a worker may use (which would end the router's process if rendered in it) answered
//! with an error while the renders beside them go on.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lorax_router::chat::{ChatError, ChatTemplate, Message};
use lorax_router::template_worker::{Renderer, RENDER_TIMEOUT, WORKER_MEMORY_BYTES};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Templates whose values grow past any memory within the fuel: a list doubled 40 times (a terabyte of
/// pointers; in the router's process it took the 24 GB of the development machine in 750 s), and 100000
/// copies of a 100 KB string joined (10 GB, 19.5 GB in 21 s before the fuel stopped it in-process).
const DOUBLING: &str =
    "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}";
const JOINED: &str = "{% set s = 'x' * 100000 %}{% set l = [s] * 100000 %}{{ l|join|length }}";

fn workers(parallel: usize) -> Renderer {
    Renderer::workers(PathBuf::from(env!("CARGO_BIN_EXE_lorax-router")), parallel)
}

fn conversation() -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        Message {
            role: "user".into(),
            content: "Hi \"there\"\nand é".into(),
        },
    ]
}

fn is_memory_error(e: &ChatError) -> bool {
    e.to_string()
        .contains(&format!("more than the {} MiB", WORKER_MEMORY_BYTES >> 20))
}

/// The doubled list reaches the memory limit in 4 s in an optimised build, some 6 s in the tests' profile:
/// on a loaded machine the render's time limit may stop it first, which is as good.
fn is_memory_or_time_error(e: &ChatError) -> bool {
    is_memory_error(e)
        || e.to_string()
            .contains(&format!("longer than {} s", RENDER_TIMEOUT.as_secs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_render_as_the_router_does_and_pass_on_template_errors() {
    let renderer = workers(2);
    let chatml = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
    for generation_prompt in [true, false] {
        let here = chatml.apply(&conversation(), generation_prompt).unwrap();
        let there = renderer
            .render(&chatml, conversation(), generation_prompt)
            .await
            .unwrap();
        assert_eq!(there, here);
    }
    let tokens = ChatTemplate::new("{{ bos_token }}{{ messages|length }}{{ eos_token }}", "<s>", "</s>").unwrap();
    assert_eq!(
        renderer.render(&tokens, conversation(), true).await.unwrap(),
        "<s>2</s>"
    );
    let refusing = ChatTemplate::new("{{ raise_exception('Only user messages, please') }}", "", "").unwrap();
    let e = renderer.render(&refusing, conversation(), true).await.unwrap_err();
    assert_eq!(e, ChatError::Render("Only user messages, please".into()));
    let looping = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let e = renderer.render(&looping, conversation(), true).await.unwrap_err();
    assert!(e.to_string().contains("ran too long"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_that_outgrow_a_worker_fail_alone() {
    let renderer = workers(2);
    let chatml = ChatTemplate::new(CHATML, "", "").unwrap();
    let want = chatml.apply(&conversation(), true).unwrap();
    let started = Instant::now();
    for (source, limited) in [
        (DOUBLING, is_memory_or_time_error as fn(&ChatError) -> bool),
        (JOINED, is_memory_error),
    ] {
        let hostile = ChatTemplate::new(source, "", "").unwrap();
        let e = renderer.render(&hostile, conversation(), true).await.unwrap_err();
        println!("{source}: {e} ({:?})", started.elapsed());
        assert!(limited(&e), "{source}: {e}");
        // The next render gets a new worker.
        assert_eq!(renderer.render(&chatml, conversation(), true).await.unwrap(), want);
    }
    // Hostile and good renders at once, more of them than workers: the good ones are served.
    let hostile = ChatTemplate::new(JOINED, "", "").unwrap();
    let renders = (0..8).map(|i| {
        let (renderer, template) = (
            renderer.clone(),
            if i % 2 == 0 { hostile.clone() } else { chatml.clone() },
        );
        tokio::spawn(async move { (i, renderer.render(&template, conversation(), true).await) })
    });
    for render in futures::future::join_all(renders).await {
        match render.unwrap() {
            (i, Ok(prompt)) if i % 2 == 1 => assert_eq!(prompt, want),
            (i, Err(e)) if i % 2 == 0 => assert!(is_memory_error(&e), "{e}"),
            (i, other) => panic!("render {i}: {other:?}"),
        }
    }
    println!(
        "ten renders, six of them stopped at the memory limit: {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}
