"""The wire contract on every route: each JSON reply carries exactly `error_code`,
`message` and `data` (COMPATIBILITY.md "Wire format"), successes with nothing to return
included (`data: ""`, as the original sends).

The test walks the route table with tests/api/route_walk.py (a route added later is
walked without anyone listing it here):

1. the scripted pass builds fixtures through the API and reaches the success path of the
   writes that have nothing to return (POST /system/, PUT /sessions/{id}, role, group,
   member, user, pool, cell, image, template, policy, rule, guest writes, POST and
   DELETE /logs/, PUT /resource_visibilities/, ...), asserting `data == ""` on each;
2. a sweep sends every (route, method) the scripted pass did not reach, with an admin
   session, nonexistent ids in the path and `{}` as the body;
3. every (route, method) again without a session.
"""

from __future__ import annotations

import pytest

from tests.api.route_walk import Walker, fill, scripted_pass

# -- the test -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_every_route_answers_the_three_keys(server, tmp_path):
    w = Walker(server)
    await scripted_pass(w, tmp_path)

    # the success paths reached, each with data "" (not only 404s)
    expected_nothing = {
        ("/api/v1/system/?", "POST"), ("/api/v1/sessions/([^/]+)/?", "PUT"),
        ("/api/v1/roles/([^/]+)/?", "POST"), ("/api/v1/roles/([^/]+)/?", "PUT"),
        ("/api/v1/users/([^/]+)/?", "POST"), ("/api/v1/users/([^/]+)/?", "PUT"),
        ("/api/v1/compute_pools/([^/]+)/?", "POST"), ("/api/v1/compute_pools/([^/]+)/?", "PUT"),
        ("/api/v1/cells/([^/]+)/?", "POST"), ("/api/v1/cells/([^/]+)/?", "PUT"),
        ("/api/v1/logs/?", "POST"), ("/api/v1/logs/?", "DELETE"),
        ("/api/v1/resource_visibilities/?", "PUT"),
    }
    assert expected_nothing <= w.nothing_routes, expected_nothing - w.nothing_routes

    # the scripted pass reached the success path of nearly every route (a new route is
    # only swept below until someone scripts it)
    succeeded = {pair for pair, outcomes in w.seen.items() if ("script", 0) in outcomes}
    assert len(succeeded) >= 0.9 * len(w.all_pairs()), sorted(
        set(w.all_pairs()) - succeeded)

    # every other (route, method), with an admin session: nonexistent ids, body {}
    w.phase = "sweep"
    for pattern, method in w.all_pairs():
        if (pattern, method) not in w.seen:
            await w.send(method, fill(pattern), {})
    # and every one without a session
    w.phase = "anonymous"
    for pattern, method in w.all_pairs():
        await w.send(method, fill(pattern), {}, session="")
    assert set(w.all_pairs()) <= set(w.seen)
