"""The HTTP layer of the function app: routes as Blueprints, the pages and JSON they answer with, and the one place
where domain outcomes become HTTP statuses. ``collectors/`` and ``shared/`` know nothing of HTTP; this package is
the only one besides ``function_app.py`` that imports ``azure.functions``.

Routes (under /api):
  GET    mailboxes                       list mailboxes with their status          (function key)   admin.py
  POST   mailboxes                       add an app-mode mailbox (access proven)   (function key)   admin.py
  GET    mailboxes/{address}             one mailbox's status                      (function key)   admin.py
  PATCH  mailboxes/{address}             change its folder, after-action or caps   (function key)   admin.py
  DELETE mailboxes/{address}             revoke: delete its token and row          (function key)   admin.py
  GET    mailboxes/{address}/authorize   start the consent flow                    (function key)   consent.py
  POST   auth/callback                   Entra's form post; anonymous because the OAuth "code" parameter
                                         collides with the function key's "code"                    consent.py
"""
