"""How `vidmini serve --ray-address` picks a replica: Ray Serve's consistent-hash router, held to the ring owner.

Ray Serve's `ConsistentHashRouter` maps a request's `session_id` (here: the video it is about) to a replica on a
hash ring, and tries the owner's ring successors too when the owner does not take the request at once: a full
queue, or a queue-length probe that misses its deadline (0.1 s; easily missed on a busy CPU machine, and then
the video's warm session would be opened a second time, on another replica). `VideoAffinityRouter` keeps the
ring but offers only the first live replica on it: the owner, waited for with Ray's backoff while it is busy,
and its successor only once Ray has found the owner dead (a failed request or probe drops it from the router;
the controller's next replica set rebuilds the ring). Requests without a video are spread over all replicas as
before. Imported by Ray Serve by its path (`ROUTER`), in the process of the deployment handle that routes.
"""

from __future__ import annotations

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

ROUTER = "vidmini.api.ray_router.VideoAffinityRouter"


class VideoAffinityRouter(ConsistentHashRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        if pending_request is not None and pending_request.metadata.session_id:
            return ranks[:1]  # the owner, or the next live replica on the ring when it is gone
        return ranks
