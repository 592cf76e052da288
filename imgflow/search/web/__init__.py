"""``imgflow serve``: the results as a web page (docs/search.md, "The web page").

- ``command.py``: the command: options, the listening socket, the server;
- ``state.py``: ``WebState``, what the app serves from (the index it follows, the query models);
- ``images.py``: images read only under the allowed roots and prefixes, and the thumbnail cache;
- ``pages.py``: the HTML pages (Jinja2, autoescaped);
- ``app.py`` and ``api.py``: the routes, of the pages and images and of the JSON API.

This package imports nothing at start (``imgflow --help`` stays quick): the command loads the rest.
"""
