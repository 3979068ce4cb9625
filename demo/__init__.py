"""``atmoe-reg demo``: an application over the catalog (``atmoe.registry``) and the model (``atmoe``).

It lives in the top-level ``demo/`` folder, apart from the model package ``atmoe/``, as torchtune's
recipes live apart from its modules: the model package imports neither the catalog nor the screen;
the demo uses both. ``pipeline.run_demo`` runs its named steps in order.
"""
