// Microsoft Entra ID stand-in for the local stack.
//
// oidc-provider (a certified OpenID Connect server) does the protocol work; this file dresses it in Entra's
// shape so that MSAL and azure-identity talk to it unchanged: tenant-scoped v2.0 paths, Entra claims
// (oid, tid, preferred_username, scp), JWT access tokens for the Exchange IMAP and Key Vault resources,
// loopback redirect URIs that match on any port, refresh-token rotation that does not revoke the redeemed token
// (a strict mode does), access tokens of a random 60 to 90 minutes, AADSTS-shaped errors with suberror and
// claims, and a managed-identity endpoint whose tokens are accepted as federated client assertions.
// A loopback control API under /_control/ injects faults, revokes accounts and changes token lifetimes (for all
// accounts, or for one account, which is what tests use so that they never change what other tests see).
//
//   node devstack/entra/server.mjs --config <path to JSON>
//
// Ready when GET {public_origin}/_control/health answers 200. State lives in memory only: a restart forgets
// every user, consent and token, so a restarted stand-in behaves like a tenant whose grants were all revoked.

import {
  createHash, createPrivateKey, createPublicKey, createSign, createVerify, randomBytes, randomInt, randomUUID,
  timingSafeEqual,
} from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { errors, interactionPolicy } from 'oidc-provider';

import { createAppTokens } from './app_tokens.mjs';

const { values: args } = parseArgs({ options: { config: { type: 'string' } } });
if (!args.config) {
  console.error('usage: node server.mjs --config <config.json>');
  process.exit(2);
}
const config = JSON.parse(readFileSync(args.config, 'utf8'));
for (const key of ['host', 'port', 'public_origin', 'tls_cert', 'tls_key', 'signing_key', 'signing_kid',
  'tenant_id', 'user_password', 'clients']) {
  if (config[key] === undefined) {
    console.error(`config is missing "${key}"`);
    process.exit(2);
  }
}

const TENANT = config.tenant_id;
const ORIGIN = config.public_origin.replace(/\/+$/, '');
const ISSUER = `${ORIGIN}/${TENANT}/v2.0`;
const PATHS = {
  discovery: `/${TENANT}/v2.0/.well-known/openid-configuration`,
  authorization: `/${TENANT}/oauth2/v2.0/authorize`,
  token: `/${TENANT}/oauth2/v2.0/token`,
  jwks: `/${TENANT}/discovery/v2.0/keys`,
  end_session: `/${TENANT}/oauth2/v2.0/logout`,
  revocation: `/${TENANT}/oauth2/v2.0/revoke`,
  userinfo: '/oidc/userinfo',
};
// Entra gives each access token a random lifetime between 60 and 90 minutes (75 on average) so that a fleet does
// not renew all at once; a fixed lifetime (config or control API) replaces it for tests that need one.
const DEFAULT_TTL_SECONDS = config.access_token_ttl_seconds ?? null;
const RANDOM_TTL_RANGE = [60 * 60, 90 * 60];
// Entra refresh tokens die after 90 days without use; each rotation starts a new 90 days.
const REFRESH_TOKEN_LIFETIME_SECONDS = 90 * 24 * 3600;
// Entra authorization codes are valid for about ten minutes.
const AUTHORIZATION_CODE_LIFETIME_SECONDS = 600;

// Resources this tenant issues access tokens for. Entra accepts both host spellings of the Exchange scopes and
// issues one audience for them; scp carries the bare permission name as in a real Outlook token.
const RESOURCES = {
  'https://outlook.office.com': {
    audience: 'https://outlook.office.com',
    scopes: ['https://outlook.office.com/IMAP.AccessAsUser.All',
      'https://outlook.office365.com/IMAP.AccessAsUser.All'],
  },
  'https://vault.azure.net': {
    audience: 'https://vault.azure.net',
    scopes: ['https://vault.azure.net/.default'],
  },
};
const SCOPE_PREFIX_TO_RESOURCE = {
  'https://outlook.office.com/': 'https://outlook.office.com',
  'https://outlook.office365.com/': 'https://outlook.office.com',
  'https://vault.azure.net/': 'https://vault.azure.net',
};
// Marks an authorization whose client itself asked for prompt=consent, so that the consent page is shown even
// when the user consented before.
const EXPLICIT_CONSENT_PARAM = 'x_stand_in_explicit_consent';
const GRANT_TYPES = new Set(['authorization_code', 'refresh_token', 'client_credentials']);

// Messages as Entra words them, so that code which matches on text sees what it would see in production.
const AADSTS_MESSAGES = {
  50000: 'There was an error issuing a token or an issue with our sign-in service.',
  50076: 'Due to a configuration change made by your administrator, or because you moved to a new location, '
    + 'you must use multi-factor authentication to access the resource.',
  50079: 'Due to a configuration change made by your administrator, or because you moved to a new location, '
    + 'you must enroll in multi-factor authentication to access the resource.',
  50126: 'Error validating credentials due to invalid username or password.',
  50173: 'The provided grant has expired due to it being revoked, a fresh auth token is needed. '
    + 'The user might have changed or reset their password.',
  53003: 'Access has been blocked by Conditional Access policies.',
  54005: 'OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing '
    + 'refresh token.',
  65001: 'The user or administrator has not consented to use the application.',
  65004: 'User declined to consent to access the app.',
  70000: "The provided value for the input parameter 'refresh_token' or 'assertion' is not valid.",
  70003: 'The app requested an unsupported grant type.',
  70008: 'The provided authorization code or refresh token has expired due to inactivity.',
  70011: "The provided value for the input parameter 'scope' is not valid.",
  70021: 'No matching federated identity record found for presented assertion.',
  70043: 'The refresh token has expired or is invalid due to sign-in frequency checks by conditional access.',
  500011: 'The resource principal was not found in the tenant.',
  700016: 'Application was not found in the directory.',
  700024: 'Client assertion is not within its valid time range.',
  700027: 'Client assertion failed signature validation.',
  700082: 'The refresh token has expired due to inactivity. The token was inactive for 90.00:00:00.',
  700211: 'No matching federated identity record found for presented assertion issuer.',
  700212: 'No matching federated identity record found for presented assertion audience.',
  700213: 'No matching federated identity record found for presented assertion subject.',
  7000215: 'Invalid client secret provided. Ensure the secret being sent in the request is the client secret '
    + 'value, not the client secret ID.',
  7000222: 'The provided client secret keys for the app are expired.',
  900144: 'The request body must contain a required parameter.',
};
// Which AADSTS code Entra attaches to each OAuth error when nothing more specific is known.
const DEFAULT_AADSTS = {
  invalid_grant: 70000,
  invalid_client: 7000215,
  unauthorized_client: 700016,
  invalid_scope: 70011,
  invalid_target: 500011,
  invalid_request: 900144,
  unsupported_grant_type: 70003,
  consent_required: 65001,
  interaction_required: 50076,
  access_denied: 65004,
  server_error: 50000,
  temporarily_unavailable: 50000,
};

// Entra adds a suberror (which MSAL reads to tell a user-fixable problem from a dead token) and, for Conditional
// Access, a claims challenge naming the policies the next sign-in must satisfy.
const SUBERRORS = {
  50076: 'basic_action',
  50079: 'basic_action',
  53003: 'message_only',
  50173: 'bad_token',
  70043: 'bad_token',
  700082: 'bad_token',
};
const CLAIMS_CHALLENGE_CODES = new Set([50076, 50079, 53003]);
// The named ways an account's refresh tokens die, with the code a later redemption gets.
const REVOCATION_REASONS = {
  password_reset: 50173,
  revoke_sessions: 50173,
  sign_in_frequency: 70043,
  inactivity: 700082,
};

// ---------------------------------------------------------------------------------------------------------
// Mutable state, all reachable from the control API.

const state = {
  accessTokenTtl: DEFAULT_TTL_SECONDS,
  // 'entra': a redeemed refresh token stays valid (until its own 90 days pass or the account is revoked);
  // 'strict': it dies at once, which the no-loss tests use to prove every rotated token is kept.
  rotation: 'entra',
  strictAccounts: new Set(), // emails whose refresh tokens rotate strictly whatever the default
  // email -> seconds: one account's access-token lifetime, so that a test shortens its own account's tokens
  // without changing them for every other test that shares the stand-in
  accountTtls: new Map(),
  faults: [],
  stats: newStats(),
  users: new Map(), // oid -> { email (the primary SMTP address), upn, name }
  // Any name an account signs in with (UPN, primary SMTP address, alias) -> { upn, mail, aliases }. A name that is
  // in no entry is an account whose UPN is that address, as in a tenant whose UPNs match the mail addresses.
  directory: new Map(),
  consents: new Map(), // `${oid}|${clientId}` -> Set of granted scope keys
  retired: new Map(), // rotated-away refresh token -> oid
  revoked: new Map(), // refresh token -> { oid, code }
};

function newStats() {
  return {
    token_requests: {},
    authorize_requests: 0,
    faults_injected: 0,
    delays_injected: 0,
    token_errors: {},
    msi_requests: 0,
    assertions_accepted: 0,
    assertions_refused: 0,
  };
}

// oid is a UUID v5 of "mailto:<lowercased address>" in the URL namespace, so any component (and a test) can
// predict the object id of a mailbox without asking: uuid.uuid5(uuid.NAMESPACE_URL, "mailto:" + address).
const NAMESPACE_URL = Buffer.from('6ba7b8119dad11d180b400c04fd430c8', 'hex');
function oidFor(email) {
  const digest = createHash('sha1').update(NAMESPACE_URL).update(`mailto:${email.toLowerCase()}`).digest();
  digest[6] = (digest[6] & 0x0f) | 0x50;
  digest[8] = (digest[8] & 0x3f) | 0x80;
  const hex = digest.subarray(0, 16).toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function displayName(email) {
  return email.split('@')[0].split(/[._-]+/).filter(Boolean)
    .map((part) => part[0].toUpperCase() + part.slice(1)).join(' ');
}

// The account a sign-in name (or login_hint) stands for: Entra accepts the UPN, and the mail address where email
// sign-in is enabled.
function accountFor(name) {
  const entry = state.directory.get(name.toLowerCase());
  return entry ?? { upn: name.toLowerCase(), mail: name.toLowerCase(), aliases: [] };
}

function emailOf(oid) {
  return state.users.get(oid)?.email;
}

function accessTokenTtl(token) {
  const own = token?.accountId ? state.accountTtls.get(emailOf(token.accountId)) : undefined;
  if (own !== undefined) return own;
  if (state.accessTokenTtl !== null) return state.accessTokenTtl;
  const [low, high] = RANDOM_TTL_RANGE;
  return low + randomInt(high - low + 1);
}

function rotatesStrictly(oid) {
  return state.rotation === 'strict' || state.strictAccounts.has(emailOf(oid));
}

// ---------------------------------------------------------------------------------------------------------
// Storage. The bundled memory adapter is an LRU of 1,000 entries, which a long demo or a benchmark would
// silently evict; this one keeps everything until it expires. Entra does not revoke a redeemed refresh token:
// by default consume() leaves it as it is, so it stays usable until its own expiry or a revocation. In strict mode
// it is deleted rather than flagged: oidc-provider treats reuse of a flagged token as theft and revokes the whole
// grant, whereas the strict mode only refuses the old token.

const store = new Map(); // `${model}:${id}` -> { payload, expiresAt }
const sessionsByUid = new Map();

class Adapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
    if (this.model === 'Session') sessionsByUid.set(payload.uid, id);
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      store.delete(this.key(id));
      return undefined;
    }
    return entry.payload;
  }

  async findByUid(uid) {
    const id = sessionsByUid.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode() {
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (!entry) return;
    if (this.model === 'RefreshToken') {
      if (!rotatesStrictly(entry.payload.accountId)) return;
      state.retired.set(id, entry.payload.accountId);
      store.delete(this.key(id));
      return;
    }
    entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    const entry = store.get(this.key(id));
    if (this.model === 'Session' && entry) sessionsByUid.delete(entry.payload.uid);
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// Expired entries are otherwise only dropped when looked up.
setInterval(() => {
  const now = Date.now();
  for (const [key, entry] of store) if (entry.expiresAt <= now) store.delete(key);
}, 60_000).unref();

// ---------------------------------------------------------------------------------------------------------
// HTML. Plain forms without scripts or external assets, so that a headless browser and a requests.Session
// can both drive them.

function esc(value) {
  return String(value ?? '').replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  })[c]);
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:sans-serif;max-width:28rem;margin:3rem auto}label{display:block;margin:.8rem 0}
input{width:100%;padding:.4rem}button{margin:.8rem .4rem 0 0;padding:.4rem 1.2rem}.error{color:#a4262c}</style>
</head><body><main>${body}</main></body></html>`;
}

function loginPage(uid, login, error) {
  return page('Sign in to your account', `<h1>Sign in</h1>
${error ? `<p class="error" id="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label>Email, phone, or Skype <input type="email" name="login" value="${esc(login)}" required></label>
<label>Password <input type="password" name="password" required></label>
<button type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientName, email, scopes) {
  const items = scopes.map((scope) => `<li>${esc(scope)}</li>`).join('');
  return page('Permissions requested', `<h1>Permissions requested</h1>
<p>Signed in as <strong id="account">${esc(email)}</strong></p>
<p><strong>${esc(clientName)}</strong> would like to:</p>
<ul id="scopes">${items}</ul>
<form method="post" action="/interaction/${esc(uid)}/consent">
<button type="submit" name="decision" value="accept">Accept</button>
<button type="submit" name="decision" value="cancel">Cancel</button>
</form>`);
}

function errorPage(error, description) {
  return page('Sign in error', `<h1>Sorry, but we're having trouble signing you in.</h1>
<p class="error" id="error" role="alert">${esc(error)}: ${esc(description)}</p>`);
}

function formPostPage(action, fields) {
  const inputs = Object.entries(fields)
    .map(([name, value]) => `<input type="hidden" name="${esc(name)}" value="${esc(value)}">`).join('\n');
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Working...</title></head>
<body onload="document.forms[0].submit()"><form method="post" action="${esc(action)}">
${inputs}
<noscript><button type="submit">Continue</button></noscript>
</form></body></html>`;
}

// ---------------------------------------------------------------------------------------------------------
// Entra-shaped errors.

function entraTimestamp(date = new Date()) {
  return `${date.toISOString().slice(0, 19).replace('T', ' ')}Z`;
}

function claimsChallenge() {
  // The policy ids are opaque to the app; MSAL passes the string back on the next interactive sign-in.
  return JSON.stringify({ access_token: { capolids: { essential: true, values: [randomUUID()] } } });
}

function entraError(ctx, error, code, message, extra = {}) {
  const timestamp = entraTimestamp();
  const traceId = randomUUID();
  // Entra echoes the client's request id as the correlation id; MSAL sends one with every request.
  const correlationId = ctx.get('client-request-id') || randomUUID();
  const text = message || AADSTS_MESSAGES[code] || error;
  const body = {
    error,
    error_description: `AADSTS${code}: ${text}\r\nTrace ID: ${traceId}\r\nCorrelation ID: ${correlationId}`
      + `\r\nTimestamp: ${timestamp}`,
    error_codes: [code],
    timestamp,
    trace_id: traceId,
    correlation_id: correlationId,
    error_uri: `https://login.microsoftonline.com/error?code=${code}`,
  };
  const suberror = extra.suberror ?? SUBERRORS[code];
  if (suberror) body.suberror = suberror;
  const claims = extra.claims ?? (CLAIMS_CHALLENGE_CODES.has(code) ? claimsChallenge() : undefined);
  if (claims) body.claims = claims;
  return body;
}

function sendEntraError(ctx, status, error, code, message, extra = {}) {
  state.stats.token_errors[code] = (state.stats.token_errors[code] ?? 0) + 1;
  ctx.status = status;
  ctx.set('cache-control', 'no-store');
  ctx.body = entraError(ctx, error, code, message, extra);
}

// ---------------------------------------------------------------------------------------------------------
// Redirect URIs: Entra ignores the port of an http://localhost or http://127.0.0.1 redirect URI when it
// matches a registered one, which the local functions host on a random port relies on.

function withoutLoopbackPort(uri) {
  const url = URL.parse(uri);
  if (!url || url.protocol !== 'http:' || !['localhost', '127.0.0.1', '[::1]'].includes(url.hostname)) {
    return undefined;
  }
  url.port = '';
  return url.href;
}

function redirectUriAllowed(registered, value) {
  if (registered.includes(value)) return true;
  const stripped = withoutLoopbackPort(value);
  return stripped !== undefined && registered.some((uri) => withoutLoopbackPort(uri) === stripped);
}

// ---------------------------------------------------------------------------------------------------------
// Provider configuration.

const signingJwk = {
  ...createPrivateKey(readFileSync(config.signing_key)).export({ format: 'jwk' }),
  kid: config.signing_kid,
  use: 'sig',
  alg: 'RS256',
};

function resourcesForScope(scope) {
  const found = new Set();
  for (const item of String(scope ?? '').split(' ')) {
    for (const [prefix, resource] of Object.entries(SCOPE_PREFIX_TO_RESOURCE)) {
      if (item.startsWith(prefix)) found.add(resource);
    }
  }
  return [...found];
}

function bareScope(scope) {
  const prefix = Object.keys(SCOPE_PREFIX_TO_RESOURCE).find((p) => scope.startsWith(p));
  return prefix ? scope.slice(prefix.length) : scope;
}

const policy = interactionPolicy.base();
// With a signed-in session oidc-provider would silently reuse it even when the app names another mailbox in
// login_hint; Entra asks the user to pick or sign in again, and so do we. A hint stays a hint: whoever signs in
// on that prompt is accepted, as with Entra (the app checks the account itself).
policy.get('login').checks.push(new interactionPolicy.Check(
  'login_hint_mismatch',
  'login_hint names another account than the signed-in one',
  (ctx) => {
    const hint = ctx.oidc.params.login_hint;
    const { accountId } = ctx.oidc.session;
    if (ctx.oidc.result?.login) return interactionPolicy.Check.NO_NEED_TO_PROMPT;
    if (hint && accountId && oidFor(accountFor(hint).mail) !== accountId) return interactionPolicy.Check.REQUEST_PROMPT;
    return interactionPolicy.Check.NO_NEED_TO_PROMPT;
  },
));

const provider = new Provider(ISSUER, {
  adapter: Adapter,
  clients: config.clients.map((client) => ({
    client_id: client.client_id,
    client_secret: client.client_secret,
    client_name: client.client_name ?? 'Mail collector',
    redirect_uris: client.redirect_uris ?? [],
    response_types: ['code'],
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    // client_secret_basic requests are rewritten to this form before oidc-provider sees them (see below).
    token_endpoint_auth_method: 'client_secret_post',
  })),
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  routes: {
    authorization: PATHS.authorization,
    token: PATHS.token,
    jwks: PATHS.jwks,
    end_session: PATHS.end_session,
    revocation: PATHS.revocation,
    userinfo: PATHS.userinfo,
  },
  responseTypes: ['code'],
  extraParams: [EXPLICIT_CONSENT_PARAM],
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  // No email claim unless the app asks for the email scope (or the optional claim): Entra leaves it out of the id
  // token by default, so an app must not count on it (docs/fidelity.md).
  claims: {
    openid: ['sub', 'oid', 'tid', 'preferred_username', 'name'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
  },
  // Entra puts the profile claims into the id token even when an access token is issued alongside it.
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: (_ctx, token) => accessTokenTtl(token),
    ClientCredentials: () => accessTokenTtl(),
    AuthorizationCode: AUTHORIZATION_CODE_LIFETIME_SECONDS,
    IdToken: 3600,
    Interaction: 3600,
    Session: 24 * 3600,
    Grant: 365 * 24 * 3600,
    RefreshToken: REFRESH_TOKEN_LIFETIME_SECONDS,
  },
  interactions: {
    policy,
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = page('Sign out', `<h1>Sign out</h1>${form}<button form="op.logoutForm" value="yes" `
          + 'name="logout">Sign out</button>');
      },
      postLogoutSuccessSource: async (ctx) => {
        ctx.body = page('Signed out', '<h1>You signed out of your account</h1>');
      },
    },
    resourceIndicators: {
      enabled: true,
      // MSAL never sends a resource parameter: like Entra, derive it from the URL prefix of the scope.
      defaultResource: async (ctx, _client, oneOf) => {
        const requested = resourcesForScope(ctx.oidc.params.scope);
        if (oneOf) return requested.find((r) => oneOf.includes(r)) ?? oneOf[0];
        if (requested.length === 0) return undefined;
        return requested.length === 1 ? requested[0] : requested;
      },
      // A refresh must yield a token for the resource the user consented to, not a userinfo token.
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, indicator) => {
        const resource = RESOURCES[indicator];
        if (!resource) throw new errors.InvalidTarget(`resource ${indicator} is not known in this tenant`);
        return {
          scope: resource.scopes.join(' '),
          audience: resource.audience,
          accessTokenFormat: 'jwt',
          accessTokenTTL: accessTokenTtl(),
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  formats: {
    customizers: {
      // Entra access tokens: typ JWT (Dovecot requires a typ header), scp instead of scope, and the
      // identity claims that Exchange and the collector read.
      jwt: async (_ctx, token, jwt) => {
        const { payload } = jwt;
        jwt.header = { typ: 'JWT' };
        const granted = String(payload.scope ?? '').split(' ').filter(Boolean);
        delete payload.scope;
        payload.tid = TENANT;
        payload.appid = payload.client_id;
        const email = token.accountId ? emailOf(token.accountId) : undefined;
        if (email) {
          const user = state.users.get(token.accountId);
          // Entra's access tokens name the account by its UPN (upn, unique_name) and carry no mail address;
          // Exchange finds the mailbox from the object id. Dovecot cannot look an oid up, so the stand-in adds the
          // account's primary SMTP address in a claim of its own (see docs/fidelity.md).
          Object.assign(payload, {
            scp: [...new Set(granted.map(bareScope))].join(' '),
            oid: token.accountId,
            preferred_username: user.upn,
            upn: user.upn,
            unique_name: user.upn,
            x_stand_in_mailbox: email,
            name: user.name,
          });
        } else {
          payload.oid = oidFor(`${payload.client_id}@apps.${TENANT}`);
          payload.idtyp = 'app';
        }
      },
    },
  },
  findAccount: async (_ctx, sub) => {
    const user = state.users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      claims: async () => ({
        sub, oid: sub, tid: TENANT, preferred_username: user.upn, email: user.email, name: user.name,
      }),
    };
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = errorPage(out.error, out.error_description);
  },
});
provider.proxy = false;

// oidc-provider only offers port-agnostic loopback matching to native clients, which would also force the
// consent page on every sign-in; Entra web apps get it too.
const registeredRedirects = new Map(config.clients.map((c) => [c.client_id, c.redirect_uris ?? []]));
provider.Client.prototype.redirectUriAllowed = function redirectAllowed(value) {
  return redirectUriAllowed(this.redirectUris, value);
};

provider.on('server_error', (_ctx, error) => {
  console.error(`server_error ${error.name}: ${error.message}`);
});

// ---------------------------------------------------------------------------------------------------------
// Request plumbing.

async function readBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) {
      const error = new Error('request body too large');
      error.status = 413;
      error.expose = true;
      throw error;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const text = await readBody(ctx.req);
  if (!text.trim()) return {};
  try {
    return JSON.parse(text);
  } catch {
    ctx.throw(400, 'body is not JSON');
  }
  return {};
}

function sleep(ms) {
  return new Promise((resolve) => { setTimeout(resolve, ms); });
}

// One line per request; the query string is left out because it carries state, codes and hints.
provider.use(async (ctx, next) => {
  const started = process.hrtime.bigint();
  const { method, path } = ctx;
  let status;
  try {
    await next();
    status = ctx.status;
  } catch (error) {
    status = error.status ?? 500;
    throw error;
  } finally {
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    console.log(`${new Date().toISOString()} ${method} ${path} ${status} ${ms.toFixed(1)}ms`);
  }
});

// ---------------------------------------------------------------------------------------------------------
// Control API.

function validateFault(body) {
  const fault = {
    endpoint: body.endpoint ?? 'token',
    error: body.error,
    aadsts: body.aadsts,
    status: body.status,
    count: body.count ?? 1,
    account: body.account ? String(body.account).toLowerCase() : undefined,
    grant_type: body.grant_type,
    delay_ms: body.delay_ms ?? 0,
    retry_after: body.retry_after,
    description: body.description,
    suberror: body.suberror,
    claims: body.claims,
  };
  if (fault.suberror !== undefined && typeof fault.suberror !== 'string') return 'suberror must be a string';
  if (fault.claims !== undefined && typeof fault.claims !== 'string') return 'claims must be a string (JSON)';
  if (!['token', 'authorize', 'msi'].includes(fault.endpoint)) {
    return 'endpoint must be "token", "authorize" or "msi"';
  }
  if (fault.endpoint === 'msi') {
    // The managed-identity endpoint answers in its own shape: a status and a message, no OAuth error.
    if (!(Number.isInteger(fault.status) && fault.status >= 400 && fault.status <= 599)) {
      return 'an msi fault needs an HTTP error status';
    }
    if (!Number.isInteger(fault.count) || fault.count < 1) return 'count must be a positive integer';
    return fault;
  }
  if (fault.error !== undefined && typeof fault.error !== 'string') return 'error must be a string';
  if (!fault.error && !(fault.endpoint === 'token' && fault.delay_ms > 0)) {
    return 'error is required unless the fault is a delay of the token endpoint';
  }
  if (fault.aadsts !== undefined && !Number.isInteger(fault.aadsts)) return 'aadsts must be an integer';
  if (fault.status !== undefined && !(Number.isInteger(fault.status) && fault.status >= 400
    && fault.status <= 599)) return 'status must be an HTTP error status';
  if (!Number.isInteger(fault.count) || fault.count < 1) return 'count must be a positive integer';
  if (!Number.isInteger(fault.delay_ms) || fault.delay_ms < 0) return 'delay_ms must be a non-negative integer';
  if (fault.retry_after !== undefined && !(Number.isInteger(fault.retry_after) && fault.retry_after >= 0)) {
    return 'retry_after must be a non-negative integer (seconds)';
  }
  if (fault.grant_type !== undefined && !GRANT_TYPES.has(fault.grant_type)) {
    return `grant_type must be one of ${[...GRANT_TYPES].join(', ')}`;
  }
  if (fault.error) {
    fault.aadsts ??= DEFAULT_AADSTS[fault.error] ?? 50000;
    fault.status ??= fault.error === 'temporarily_unavailable' ? 503 : 400;
  }
  return fault;
}

function takeFault(endpoint, { grantType, account }) {
  const index = state.faults.findIndex((f) => f.endpoint === endpoint
    && (f.grant_type === undefined || f.grant_type === grantType)
    && (f.account === undefined || f.account === account));
  if (index === -1) return undefined;
  const fault = state.faults[index];
  fault.count -= 1;
  if (fault.count === 0) state.faults.splice(index, 1);
  return fault;
}

function revokeAccount(email, code) {
  const oid = oidFor(email);
  let tokens = 0;
  const grants = [];
  for (const [key, entry] of store) {
    if (entry.payload.accountId !== oid) continue;
    if (key.startsWith('RefreshToken:')) {
      state.revoked.set(key.slice('RefreshToken:'.length), { oid, code });
      tokens += 1;
    }
    if (key.startsWith('Grant:')) grants.push(key.slice('Grant:'.length));
  }
  for (const [token, owner] of state.retired) if (owner === oid) state.revoked.set(token, { oid, code });
  for (const grantId of grants) {
    for (const [key, entry] of store) if (entry.payload.grantId === grantId) store.delete(key);
    store.delete(`Grant:${grantId}`);
  }
  return { refresh_tokens: tokens, grants: grants.length };
}

// The public half of the signing key, which every tenant's key document lists.
function publicJwk() {
  const { kty, n, e } = signingJwk;
  return { kty, n, e, kid: config.signing_kid, use: 'sig', alg: 'RS256' };
}

const appTokens = createAppTokens({
  config,
  origin: ORIGIN,
  homeTenant: TENANT,
  signJwt: (claims) => signJwt(claims),
  oidFor,
  sendEntraError,
  defaultTtl: () => accessTokenTtl(),
});
provider.use(appTokens.routes(readJson, () => ({ keys: [publicJwk()] })));

provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/_control/')) return next();
  ctx.set('cache-control', 'no-store');
  const route = `${ctx.method} ${ctx.path}`;
  switch (route) {
    case 'GET /_control/health':
      ctx.body = { status: 'ok', issuer: ISSUER };
      return undefined;
    case 'GET /_control/faults':
      ctx.body = { faults: state.faults };
      return undefined;
    case 'POST /_control/faults': {
      const fault = validateFault(await readJson(ctx));
      if (typeof fault === 'string') {
        ctx.status = 400;
        ctx.body = { error: fault };
        return undefined;
      }
      state.faults.push(fault);
      ctx.status = 201;
      ctx.body = { faults: state.faults };
      return undefined;
    }
    case 'DELETE /_control/faults':
      state.faults = [];
      ctx.status = 204;
      return undefined;
    case 'POST /_control/revoke': {
      const body = await readJson(ctx);
      if (typeof body.account !== 'string' || !body.account.includes('@')) {
        ctx.status = 400;
        ctx.body = { error: 'account (an email address) is required' };
        return undefined;
      }
      if (body.reason !== undefined && !(body.reason in REVOCATION_REASONS)) {
        ctx.status = 400;
        ctx.body = { error: `reason must be one of ${Object.keys(REVOCATION_REASONS).join(', ')}` };
        return undefined;
      }
      const code = body.aadsts ?? REVOCATION_REASONS[body.reason ?? 'password_reset'];
      if (!Number.isInteger(code)) {
        ctx.status = 400;
        ctx.body = { error: 'aadsts must be an integer' };
        return undefined;
      }
      ctx.body = { account: body.account.toLowerCase(), aadsts: code, ...revokeAccount(body.account, code) };
      return undefined;
    }
    case 'POST /_control/settings': {
      const body = await readJson(ctx);
      const ttl = body.access_token_ttl_seconds;
      if (ttl !== undefined) {
        // null restores Entra's random 60 to 90 minutes.
        if (ttl !== null && (!Number.isInteger(ttl) || ttl < 1)) {
          ctx.status = 400;
          ctx.body = { error: 'access_token_ttl_seconds must be a positive integer or null' };
          return undefined;
        }
        state.accessTokenTtl = ttl;
      }
      const byAccount = body.access_token_ttl_by_account;
      if (byAccount !== undefined) {
        // { "<email>": seconds } sets that account's lifetime; null gives it the stand-in's default again.
        const entries = byAccount !== null && typeof byAccount === 'object' && !Array.isArray(byAccount)
          ? Object.entries(byAccount) : null;
        if (!entries || !entries.every(([account, seconds]) => account.includes('@')
          && (seconds === null || (Number.isInteger(seconds) && seconds >= 1)))) {
          ctx.status = 400;
          ctx.body = { error: 'access_token_ttl_by_account must map email addresses to positive integers or null' };
          return undefined;
        }
        for (const [account, seconds] of entries) {
          if (seconds === null) state.accountTtls.delete(account.toLowerCase());
          else state.accountTtls.set(account.toLowerCase(), seconds);
        }
      }
      const { rotation } = body;
      if (rotation !== undefined) {
        if (!['entra', 'strict'].includes(rotation)) {
          ctx.status = 400;
          ctx.body = { error: 'rotation must be "entra" or "strict"' };
          return undefined;
        }
        state.rotation = rotation;
      }
      for (const [field, add] of [['strict_accounts', true], ['entra_accounts', false]]) {
        const accounts = body[field];
        if (accounts === undefined) continue;
        if (!Array.isArray(accounts) || !accounts.every((a) => typeof a === 'string' && a.includes('@'))) {
          ctx.status = 400;
          ctx.body = { error: `${field} must be a list of email addresses` };
          return undefined;
        }
        for (const account of accounts) {
          if (add) state.strictAccounts.add(account.toLowerCase());
          else state.strictAccounts.delete(account.toLowerCase());
        }
      }
      ctx.body = {
        access_token_ttl_seconds: state.accessTokenTtl,
        access_token_ttl_by_account: Object.fromEntries(state.accountTtls),
        rotation: state.rotation,
        strict_accounts: [...state.strictAccounts],
      };
      return undefined;
    }
    case 'POST /_control/accounts': {
      // { upn, mail, aliases }: an account whose user principal name differs from its primary SMTP address, and
      // the other addresses of its mailbox. Each name signs in as the same account (one oid, from mail).
      const { upn, mail, aliases = [] } = (await readJson(ctx)) ?? {};
      const names = [upn, mail, ...(Array.isArray(aliases) ? aliases : [null])];
      if (!names.every((n) => typeof n === 'string' && /^[^@\s:/]+@[^@\s:/]+$/.test(n))) {
        ctx.status = 400;
        ctx.body = { error: 'upn, mail and aliases must be addresses (aliases a list)' };
        return undefined;
      }
      const entry = { upn: upn.toLowerCase(), mail: mail.toLowerCase(), aliases: aliases.map((a) => a.toLowerCase()) };
      for (const name of names) state.directory.set(name.toLowerCase(), entry);
      ctx.body = { ...entry, oid: oidFor(entry.mail) };
      return undefined;
    }
    case 'GET /_control/stats':
      ctx.body = { ...state.stats, faults_pending: state.faults.length };
      return undefined;
    case 'POST /_control/reset':
      // Issued tokens survive a reset on purpose: apps under test keep the mailboxes they already consented.
      state.faults = [];
      state.stats = newStats();
      state.accessTokenTtl = DEFAULT_TTL_SECONDS;
      state.rotation = 'entra';
      state.strictAccounts.clear();
      state.accountTtls.clear();
      state.consents.clear();
      ctx.status = 204;
      return undefined;
    default:
      ctx.status = 404;
      ctx.body = { error: `no control route ${route}` };
      return undefined;
  }
});

// Entra serves discovery under /{tenant}/v2.0/, beside rather than above its endpoints; oidc-provider has one
// fixed discovery path.
provider.use(async (ctx, next) => {
  if (ctx.path === PATHS.discovery) ctx.path = '/.well-known/openid-configuration';
  return next();
});

// ---------------------------------------------------------------------------------------------------------
// Sign-in and consent pages.

function consentKey(oid, clientId) {
  return `${oid}|${clientId}`;
}

function missingScopeKeys(missing) {
  const keys = (missing.missingOIDCScope ?? []).map((scope) => `openid|${scope}`);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    for (const scope of scopes) keys.push(`${indicator}|${scope}`);
  }
  return keys;
}

async function finishConsent(ctx, details) {
  const { prompt: { details: missing }, params, session: { accountId } } = details;
  let grant = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
  const isNew = !grant;
  grant ??= new provider.Grant({ accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  const key = consentKey(accountId, params.client_id);
  const remembered = state.consents.get(key) ?? new Set();
  for (const item of missingScopeKeys(missing)) remembered.add(item);
  state.consents.set(key, remembered);
  const target = await provider.interactionResult(ctx.req, ctx.res, { consent: isNew ? { grantId } : {} }, {
    mergeWithLastSubmission: true,
  });
  ctx.redirect(target);
  ctx.status = 303;
}

async function interactions(ctx, uid, action) {
  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
  } catch (error) {
    if (!(error instanceof errors.SessionNotFound)) throw error;
    ctx.status = 400;
    ctx.type = 'html';
    ctx.body = errorPage('invalid_request', 'The sign-in session has expired or was not found. Start again.');
    return;
  }
  if (details.uid !== uid) {
    ctx.status = 400;
    ctx.type = 'html';
    ctx.body = errorPage('invalid_request', 'This sign-in page belongs to another sign-in attempt.');
    return;
  }
  const prompt = details.prompt.name;
  const client = await provider.Client.find(details.params.client_id);
  ctx.set('cache-control', 'no-store');
  ctx.type = 'html';

  if (ctx.method === 'GET' && !action) {
    if (prompt === 'login') {
      ctx.body = loginPage(uid, details.params.login_hint ?? '');
      return;
    }
    if (prompt === 'consent') {
      const accountId = details.session.accountId;
      const remembered = state.consents.get(consentKey(accountId, details.params.client_id));
      const needed = missingScopeKeys(details.prompt.details);
      // Entra asks once per user and app (unless the app insists with prompt=consent); later sign-ins go
      // straight back to the app.
      const explicit = details.params[EXPLICIT_CONSENT_PARAM] === '1';
      if (!explicit && needed.every((item) => remembered?.has(item))) {
        await finishConsent(ctx, details);
        return;
      }
      ctx.body = consentPage(uid, client?.clientName ?? details.params.client_id, emailOf(accountId),
        needed.map((item) => item.split('|')[1]));
      return;
    }
  }

  if (ctx.method === 'POST' && action === 'login' && prompt === 'login') {
    const form = new URLSearchParams(await readBody(ctx.req));
    const login = (form.get('login') ?? '').trim().toLowerCase();
    const password = Buffer.from(form.get('password') ?? '');
    const expected = Buffer.from(String(config.user_password));
    if (!/^[^@\s]+@[^@\s]+\.[^@\s]+$/.test(login)) {
      ctx.body = loginPage(uid, login, 'Enter a valid email address.');
      return;
    }
    if (password.length !== expected.length || !timingSafeEqual(password, expected)) {
      ctx.body = loginPage(uid, login, `AADSTS50126: ${AADSTS_MESSAGES[50126]}`);
      return;
    }
    const account = accountFor(login);
    const oid = oidFor(account.mail);
    state.users.set(oid, { email: account.mail, upn: account.upn, name: displayName(account.mail) });
    const target = await provider.interactionResult(ctx.req, ctx.res, { login: { accountId: oid } }, {
      mergeWithLastSubmission: false,
    });
    ctx.redirect(target);
    ctx.status = 303;
    return;
  }

  if (ctx.method === 'POST' && action === 'consent' && prompt === 'consent') {
    const form = new URLSearchParams(await readBody(ctx.req));
    if (form.get('decision') === 'accept') {
      await finishConsent(ctx, details);
      return;
    }
    const target = await provider.interactionResult(ctx.req, ctx.res, {
      error: 'access_denied',
      error_description: `AADSTS65004: ${AADSTS_MESSAGES[65004]}`,
    }, { mergeWithLastSubmission: false });
    ctx.redirect(target);
    ctx.status = 303;
    return;
  }

  ctx.status = 400;
  ctx.body = errorPage('invalid_request', `Unexpected ${ctx.method} for the ${prompt} step.`);
}

provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|consent))?$/.exec(ctx.path);
  if (!match) return next();
  return interactions(ctx, match[1], match[2]);
});

// ---------------------------------------------------------------------------------------------------------
// Authorization endpoint: injected errors come back to the app the way Entra sends them, in the requested
// response mode, after checking client and redirect URI so that the stand-in never redirects elsewhere.

// oidc-provider follows OpenID Connect to the letter and drops offline_access unless prompt=consent is asked
// for; Entra issues refresh tokens for offline_access alone. Asking for consent on the client's behalf keeps the
// refresh token, and the interaction below skips the page again when the user already consented.
function promptForOfflineAccess(ctx) {
  if (ctx.method !== 'GET' || !String(ctx.query.scope ?? '').split(' ').includes('offline_access')) return;
  const prompts = new Set(String(ctx.query.prompt ?? '').split(' ').filter(Boolean));
  if (prompts.has('none')) return;
  const query = { ...ctx.query };
  delete query[EXPLICIT_CONSENT_PARAM];
  if (prompts.has('consent')) query[EXPLICIT_CONSENT_PARAM] = '1';
  // Entra's account picker has no counterpart here: picking an account means signing in.
  if (prompts.delete('select_account')) prompts.add('login');
  prompts.add('consent');
  query.prompt = [...prompts].join(' ');
  ctx.query = query;
}

// An error handed back through form_post is a page that posts to the app: Entra serves it with 200, and a
// browser or requests.Session must simply submit it. oidc-provider answers such pages with 400.
provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith(`${PATHS.authorization}/`) && ctx.path !== PATHS.authorization) return next();
  await next();
  if (ctx.status === 400 && ctx.response.is('html') && typeof ctx.body === 'string'
    && ctx.body.includes('<form method="post"')) {
    ctx.status = 200;
  }
  return undefined;
});

provider.use(async (ctx, next) => {
  if (ctx.path !== PATHS.authorization) return next();
  state.stats.authorize_requests += 1;
  promptForOfflineAccess(ctx);
  const params = ctx.method === 'GET' ? ctx.query : {};
  const account = params.login_hint ? String(params.login_hint).toLowerCase() : undefined;
  const registered = registeredRedirects.get(params.client_id);
  if (!registered || !params.redirect_uri || !redirectUriAllowed(registered, params.redirect_uri)) return next();
  const fault = takeFault('authorize', { account });
  if (!fault) return next();
  state.stats.faults_injected += 1;
  const body = entraError(ctx, fault.error, fault.aadsts, fault.description, fault);
  const fields = { error: body.error, error_description: body.error_description, error_uri: body.error_uri };
  if (params.state) fields.state = params.state;
  ctx.set('cache-control', 'no-store');
  if (params.response_mode === 'form_post') {
    ctx.type = 'html';
    ctx.body = formPostPage(params.redirect_uri, fields);
    return undefined;
  }
  const target = new URL(params.redirect_uri);
  for (const [name, value] of Object.entries(fields)) target.searchParams.set(name, value);
  ctx.redirect(target.href);
  return undefined;
});

// ---------------------------------------------------------------------------------------------------------
// Managed identities and federated credentials. A user-assigned managed identity gets its tokens from the App
// Service identity endpoint (IDENTITY_ENDPOINT with the X-IDENTITY-HEADER secret, api-version 2019-08-01); its
// token for api://AzureADTokenExchange is the client assertion of an app registration that trusts it through a
// federated identity credential (issuer, subject = the identity's principal id, audience). Entra checks the
// assertion against the app's federated credentials: no issuer match is AADSTS700211, no audience match
// AADSTS700212, no subject match AADSTS700213; then the signature and the time range.

const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const MSI_PATH = '/msi/token';
const MSI_TOKEN_LIFETIME_SECONDS = 24 * 3600; // managed-identity tokens are cached by the platform for about a day
const signingPrivateKey = createPrivateKey(readFileSync(config.signing_key));
const signingPublicKey = createPublicKey(signingPrivateKey);
const managedIdentities = new Map((config.managed_identities ?? []).map((mi) => [mi.client_id, mi]));
const federatedCredentials = new Map(config.clients.map((c) => [c.client_id, c.federated_credentials ?? []]));
const clientSecrets = new Map(config.clients.map((c) => [c.client_id, c.client_secret]));

function signJwt(payload) {
  const header = { alg: 'RS256', typ: 'JWT', kid: config.signing_kid };
  const encode = (part) => Buffer.from(JSON.stringify(part)).toString('base64url');
  const input = `${encode(header)}.${encode(payload)}`;
  const signature = createSign('RSA-SHA256').update(input).sign(signingPrivateKey).toString('base64url');
  return `${input}.${signature}`;
}

function verifiedJwt(jwt) {
  const parts = String(jwt).split('.');
  if (parts.length !== 3) return undefined;
  let payload;
  try {
    payload = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
  const valid = createVerify('RSA-SHA256').update(`${parts[0]}.${parts[1]}`)
    .verify(signingPublicKey, Buffer.from(parts[2], 'base64url'));
  return { payload, valid };
}

function clientAssertionRefusal(params, path) {
  const byCertificate = appTokens.certificateAssertion(params, path);
  if (byCertificate) return byCertificate.refusal;
  const clientId = params.get('client_id') ?? '';
  const parsed = verifiedJwt(params.get('client_assertion') ?? '');
  if (!parsed || typeof parsed.payload !== 'object' || parsed.payload === null) {
    return { code: 700027, error: 'invalid_client', message: 'Client assertion is not a valid JWT.' };
  }
  const { payload, valid } = parsed;
  const audiences = Array.isArray(payload.aud) ? payload.aud : [payload.aud];
  const trusted = federatedCredentials.get(clientId) ?? [];
  const detail = `Assertion Issuer: '${payload.iss}'. Assertion Subject: '${payload.sub}'. `
    + `Assertion Audience: '${audiences.join(',')}'.`;
  const byIssuer = trusted.filter((fic) => fic.issuer === payload.iss);
  if (byIssuer.length === 0) {
    return { code: 700211, error: 'invalid_request', message: `${AADSTS_MESSAGES[700211]} ${detail}` };
  }
  const byAudience = byIssuer.filter((fic) => fic.audiences.some((a) => audiences.includes(a)));
  if (byAudience.length === 0) {
    return { code: 700212, error: 'invalid_request', message: `${AADSTS_MESSAGES[700212]} ${detail}` };
  }
  if (!byAudience.some((fic) => fic.subject === payload.sub)) {
    return { code: 700213, error: 'invalid_request', message: `${AADSTS_MESSAGES[700213]} ${detail}` };
  }
  if (!valid) return { code: 700027, error: 'invalid_client' };
  const now = Math.floor(Date.now() / 1000);
  if (!(Number.isInteger(payload.exp) && payload.exp > now) || (Number.isInteger(payload.nbf) && payload.nbf > now + 300)) {
    return { code: 700024, error: 'invalid_client' };
  }
  // oidc-provider knows one authentication method per client: an assertion that passed Entra's checks stands
  // for the client's own credential from here on.
  params.delete('client_assertion');
  params.delete('client_assertion_type');
  params.set('client_secret', clientSecrets.get(clientId) ?? '');
  return undefined;
}

function msiError(ctx, status, message) {
  ctx.status = status;
  ctx.set('cache-control', 'no-store');
  ctx.body = { statusCode: status, message, correlationId: randomUUID() };
}

provider.use(async (ctx, next) => {
  if (ctx.path !== MSI_PATH) return next();
  state.stats.msi_requests += 1;
  const expected = Buffer.from(String(config.identity_header ?? ''));
  const given = Buffer.from(ctx.get('x-identity-header'));
  if (ctx.method !== 'GET') return msiError(ctx, 405, 'Only GET is supported.');
  if (!expected.length || given.length !== expected.length || !timingSafeEqual(given, expected)) {
    return msiError(ctx, 401, 'The X-IDENTITY-HEADER header is missing or wrong.');
  }
  const fault = takeFault('msi', {});
  if (fault) {
    state.stats.faults_injected += 1;
    if (fault.retry_after !== undefined) ctx.set('retry-after', String(fault.retry_after));
    return msiError(ctx, fault.status, fault.description ?? 'Injected managed identity failure.');
  }
  const resource = String(ctx.query.resource ?? '');
  if (!resource) return msiError(ctx, 400, 'The resource parameter is required.');
  const identity = managedIdentities.get(String(ctx.query.client_id ?? ''));
  if (!identity) {
    return msiError(ctx, 400, 'No User Assigned or Delegated Managed Identity found for specified ClientId/ResourceId/PrincipalId.');
  }
  const now = Math.floor(Date.now() / 1000);
  const token = signJwt({
    aud: resource,
    iss: ISSUER,
    iat: now,
    nbf: now,
    exp: now + MSI_TOKEN_LIFETIME_SECONDS,
    sub: identity.principal_id,
    oid: identity.principal_id,
    tid: TENANT,
    appid: identity.client_id,
    azp: identity.client_id,
    idtyp: 'app',
  });
  ctx.set('cache-control', 'no-store');
  ctx.body = {
    access_token: token,
    expires_on: String(now + MSI_TOKEN_LIFETIME_SECONDS),
    resource,
    token_type: 'Bearer',
    client_id: identity.client_id,
  };
  return undefined;
});

// ---------------------------------------------------------------------------------------------------------
// Token endpoint: statistics, fault injection, revoked and rotated refresh tokens, client_secret_basic, and
// the Entra additions to the response (client_info, AADSTS error bodies).

function accountOfGrant(grantType, params) {
  if (grantType === 'refresh_token') {
    const value = params.get('refresh_token') ?? '';
    const oid = store.get(`RefreshToken:${value}`)?.payload.accountId
      ?? state.retired.get(value) ?? state.revoked.get(value)?.oid;
    return oid ? emailOf(oid) : undefined;
  }
  if (grantType === 'authorization_code') {
    const oid = store.get(`AuthorizationCode:${params.get('code') ?? ''}`)?.payload.accountId;
    return oid ? emailOf(oid) : undefined;
  }
  return undefined;
}

// Entra accepts either client authentication method for one app registration; oidc-provider allows one per
// client, so Basic credentials (RFC 6749 2.3.1: form-encoded, then base64) are moved into the body.
function basicToPost(ctx, params) {
  const header = ctx.get('authorization');
  if (!/^basic /i.test(header)) return;
  const decoded = Buffer.from(header.slice(6).trim(), 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon === -1) return;
  const unform = (s) => decodeURIComponent(s.replace(/\+/g, ' '));
  try {
    params.set('client_id', unform(decoded.slice(0, colon)));
    params.set('client_secret', unform(decoded.slice(colon + 1)));
  } catch {
    return; // malformed escapes: leave the header for oidc-provider to refuse
  }
  delete ctx.req.headers.authorization;
}

function decodeJwtPayload(jwt) {
  return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString('utf8'));
}

provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || !([PATHS.token, PATHS.revocation].includes(ctx.path)
    || appTokens.isOtherTenantTokenPath(ctx.path))) return next();
  const params = new URLSearchParams(await readBody(ctx.req));
  basicToPost(ctx, params);
  if (ctx.path === PATHS.token && params.get('client_assertion_type') === JWT_BEARER) {
    const refused = clientAssertionRefusal(params, ctx.path);
    if (refused) {
      state.stats.assertions_refused += 1;
      const error = refused.error ?? 'invalid_client';
      sendEntraError(ctx, error === 'invalid_client' ? 401 : 400, error, refused.code, refused.message);
      return undefined;
    }
    state.stats.assertions_accepted += 1;
  }
  // oidc-provider reads a body that an earlier middleware consumed from req.body (and says so once on stderr:
  // "already parsed request body detected", expected here).
  ctx.req.body = params.toString();
  if (ctx.path === PATHS.revocation) return next();

  const grantType = params.get('grant_type') ?? 'missing';
  state.stats.token_requests[grantType] = (state.stats.token_requests[grantType] ?? 0) + 1;
  const fault = takeFault('token', { grantType, account: accountOfGrant(grantType, params) });
  if (fault) {
    state.stats.faults_injected += 1;
    if (fault.delay_ms) {
      state.stats.delays_injected += 1;
      await sleep(fault.delay_ms);
    }
    if (fault.error) {
      // MSAL honours Retry-After: it answers the same request from its own cache until the time is up.
      if (fault.retry_after !== undefined) ctx.set('retry-after', String(fault.retry_after));
      sendEntraError(ctx, fault.status, fault.error, fault.aadsts, fault.description, fault);
      return undefined;
    }
  }
  if (grantType === 'authorization_code') {
    // oidc-provider would also revoke every token of the grant on a replayed code; Entra only refuses the code.
    const code = store.get(`AuthorizationCode:${params.get('code') ?? ''}`);
    if (code?.payload.consumed) {
      sendEntraError(ctx, 400, 'invalid_grant', 54005);
      return undefined;
    }
  }
  if (grantType === 'refresh_token') {
    const value = params.get('refresh_token') ?? '';
    const revoked = state.revoked.get(value);
    if (revoked) {
      sendEntraError(ctx, 400, 'invalid_grant', revoked.code);
      return undefined;
    }
    if (state.retired.has(value)) {
      sendEntraError(ctx, 400, 'invalid_grant', 70000, `${AADSTS_MESSAGES[70000]} `
        + 'The refresh token was already redeemed and replaced by a newer one.');
      return undefined;
    }
  }

  await next();

  const body = ctx.body;
  if (!body || typeof body !== 'object' || Buffer.isBuffer(body)) return undefined;
  if (body.error && !body.error_codes) { // oidc-provider's own errors; Entra-shaped ones stay as they are
    const code = DEFAULT_AADSTS[body.error] ?? 50000;
    sendEntraError(ctx, ctx.status, body.error, code, `${AADSTS_MESSAGES[code] ?? body.error} `
      + `(${body.error_description ?? body.error})`);
    return undefined;
  }
  if (body.access_token && body.expires_in !== undefined) body.ext_expires_in = body.expires_in;
  if (body.id_token) {
    // MSAL keys its account cache by client_info (uid.utid), as Entra returns it when asked with client_info=1.
    const claims = decodeJwtPayload(body.id_token);
    body.client_info = Buffer.from(JSON.stringify({ uid: claims.oid, utid: claims.tid })).toString('base64url');
  }
  return undefined;
});

// App-only tokens (client credentials for Exchange, other tenants): devstack/entra/app_tokens.mjs.
provider.use(appTokens.tokenEndpoint);

// ---------------------------------------------------------------------------------------------------------

const server = createServer({
  key: readFileSync(config.tls_key),
  cert: readFileSync(config.tls_cert),
}, provider.callback());

server.listen(config.port, config.host, () => {
  console.log(`entra stand-in listening on https://${config.host}:${config.port} issuer=${ISSUER}`);
});

function shutdown(signal) {
  console.log(`entra stand-in stopping on ${signal}`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
