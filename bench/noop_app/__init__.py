"""A no-op Flower app: the floor of a deployment's message path (section ``deploy-overhead``, bench/deploy_overhead.py).

``server.py`` sends one empty ``query.noop`` message per round to every SuperNode and times each round trip;
``client.py`` answers at once. The ClientApp imports Flower only (no torch, no ecavg), so a round trip is Flower's own
cost: the SuperNode pulling the message, SuperExec starting a ClientApp process, the reply going back, and the
server's polling. The two live in separate modules so that the ClientApp process imports nothing else.
"""
