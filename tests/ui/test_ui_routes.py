"""The routes page over HTTP: evidence, pairs, and moving a route (admins only)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from helpers import (
    RunningProxy,
    ServerThread,
    wait_for,
)
from ui_data import ADMIN, ALICE, csrf_of, routed_dashboard, sign_in

# -- routes ---------------------------------------------------------------------------


def test_the_routes_page_shows_evidence_and_pairs_and_moves_a_route(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """Each route's mode, its score with the interval, the newest pairs (teacher's and
    student's answers, graded); promote, demote and off as an admin with the CSRF token,
    a promotion the evidence does not support refused with the reason."""
    from fake_student import TEACHER_TEXT, ask, samples

    proxy = routed_dashboard(start_proxy, servers)
    admin = sign_in(proxy, ADMIN)
    page = admin.get("/ui/routes").text
    assert 'id="mode-support">shadow<' in page and "No graded pairs yet" in page
    token = csrf_of(page)
    early = admin.post("/ui/routes/support/promote", data={"csrf": token})
    assert early.status_code == 303 and "failed=" in early.headers["location"]
    assert "stays in shadow" in admin.get(early.headers["location"]).text

    # 40 perfect pairs: enough for the anytime-valid lower bound to reach the bar of 0.9.
    for n in range(40):
        assert ask(proxy, n).status_code == 200
    wait_for(lambda: len(samples(proxy)) == 40, 20, "forty graded pairs")
    proxy.wait_stored(40)  # the teacher's calls too (written apart from the pairs)
    page = admin.get("/ui/routes").text
    assert re.search(r'class="score">1\.000 <small>\[0\.907, 1\.000\]</small>', page)
    assert "clears the bar" in page
    pairs = re.findall(
        r'<pre class="teacher">([^<]*)</pre></td>\s*<td><pre class="student">([^<]*)</pre>', page
    )
    # Both answers as stored: redacted (the teacher's text carries an e-mail address).
    redacted = TEACHER_TEXT.replace("bob@example.com", "[REDACTED:email]")
    assert redacted != TEACHER_TEXT and pairs and set(pairs) == {(redacted, redacted)}
    assert page.count('class="verdict pass">exact: 1<') == len(pairs)

    def press(action: str) -> str:
        answer = admin.post(f"/ui/routes/support/{action}", data={"csrf": token})
        assert answer.status_code == 303
        return admin.get(answer.headers["location"]).text

    assert "Route support: shadow -&gt; canary." in press("promote")
    assert "Route support: canary -&gt; off." in press("off")
    page = admin.get("/ui/routes").text
    assert 'id="mode-support">off<' in page and "from the dashboard by" in page
    assert re.search(r'id="off-support" disabled', page)
    # Without the token, or not an admin: refused, and nothing moves.
    assert admin.post("/ui/routes/support/promote", data={}).status_code == 403
    alice = sign_in(proxy, ALICE)
    assert alice.get("/ui/routes").status_code == 403
    alice_token = csrf_of(alice.get("/ui/completions").text)
    assert alice.post("/ui/routes/support/promote", data={"csrf": alice_token}).status_code == 403
    assert route_states(proxy)["support"]["mode"] == "off"


def route_states(proxy: RunningProxy) -> dict[str, Any]:
    from distillery.store import routes as route_store

    return route_store.states(proxy.reader)
