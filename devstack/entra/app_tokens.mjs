// App-only tokens of the Entra stand-in: the client-credentials grant for Exchange Online's application permission
// IMAP.AccessAsApp, in the home tenant and in further tenants where a multitenant app was consented.
//
// As Entra does it (Microsoft identity platform, "OAuth 2.0 client credentials flow"; Exchange's "Authenticate an
// IMAP, POP or SMTP connection using OAuth"):
// - the scope is the resource with /.default (https://outlook.office365.com/.default); anything else is
//   AADSTS1002012;
// - the token's aud is the resource as asked for, oid and sub are the object id of the enterprise application (the
//   service principal) in the tenant that issued it, idtyp is "app", and roles lists the application permissions
//   an admin consented in that tenant: without consent Entra still issues the token, with no roles claim;
// - the client authenticates with its secret, a federated credential (checked by server.mjs) or a certificate: a
//   client assertion it signed itself (iss = sub = client id, aud = the token endpoint, x5t or x5t#S256 naming the
//   certificate, RS256 or PS256);
// - an app unknown in the tenant (never consented there) is AADSTS700016, a disabled one AADSTS7000112.
// Dovecot 2.3 cannot read a JSON array from a JWT, so the token also carries x_stand_in_roles, the roles joined by
// spaces, for the Exchange stand-in's grant list (docs/fidelity.md); the app reads roles only.

import { constants, createHash, createPublicKey, createVerify, randomBytes } from 'node:crypto';

const EXCHANGE_RESOURCES = ['https://outlook.office365.com', 'https://outlook.office.com'];
const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

export function createAppTokens({ config, origin, homeTenant, signJwt, oidFor, sendEntraError, defaultTtl }) {
  const clients = new Map(config.clients.map((c) => [c.client_id, c]));
  // tenant id -> client id -> { roles, disabled, ttl }: which apps exist (are consented) in which tenant.
  function initialTenants() {
    const tenants = new Map();
    const home = new Map();
    for (const client of config.clients) {
      home.set(client.client_id, { roles: [...(client.app_roles ?? [])], disabled: false, ttl: null });
    }
    tenants.set(homeTenant, home);
    for (const other of config.other_tenants ?? []) {
      const apps = new Map();
      for (const [clientId, roles] of Object.entries(other.consented_apps ?? {})) {
        apps.set(clientId, { roles: [...roles], disabled: false, ttl: null });
      }
      tenants.set(other.tenant_id, apps);
    }
    return tenants;
  }
  let tenants = initialTenants();
  let issued = 0;

  const tokenPath = (tenant) => `/${tenant}/oauth2/v2.0/token`;
  const issuerOf = (tenant) => `${origin}/${tenant}/v2.0`;

  function tenantOfTokenPath(path) {
    const match = /^\/([^/]+)\/oauth2\/v2\.0\/token$/.exec(path);
    return match && tenants.has(match[1]) ? match[1] : undefined;
  }

  function isOtherTenantTokenPath(path) {
    const tenant = tenantOfTokenPath(path);
    return tenant !== undefined && tenant !== homeTenant;
  }

  function servicePrincipalId(clientId, tenant) {
    return oidFor(`${clientId}@apps.${tenant}`);
  }

  // --- certificate credentials -------------------------------------------------------------------------------

  function thumbprints(pem) {
    const der = Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
    return {
      sha1: createHash('sha1').update(der).digest('base64url'),
      sha256: createHash('sha256').update(der).digest('base64url'),
    };
  }

  const certificates = new Map(); // client id -> [{ sha1, sha256, key }]
  for (const client of config.clients) {
    certificates.set(client.client_id, (client.certificates ?? []).map((pem) => ({
      ...thumbprints(pem), key: createPublicKey(pem),
    })));
  }

  function decode(part) {
    try {
      return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
    } catch {
      return undefined;
    }
  }

  // A client assertion the app signed itself with its certificate. Returns undefined when the assertion is not
  // one (a federated credential's token, which server.mjs checks), else { refusal } or { refusal: undefined }.
  function certificateAssertion(params, path) {
    if (params.get('client_assertion_type') !== JWT_BEARER) return undefined;
    const clientId = params.get('client_id') ?? '';
    const parts = String(params.get('client_assertion') ?? '').split('.');
    const header = parts.length === 3 ? decode(parts[0]) : undefined;
    const payload = parts.length === 3 ? decode(parts[1]) : undefined;
    if (!header || !payload || payload.iss !== payload.sub || payload.iss !== clientId || !clients.has(clientId)) {
      return undefined;
    }
    const refuse = (code, message) => ({ refusal: { code, error: 'invalid_client', message } });
    const known = certificates.get(clientId) ?? [];
    // MSAL pads its x5t ("...="); the thumbprint is the same either way, as Entra reads it.
    const unpadded = (value) => String(value ?? '').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
    const cert = known.find((c) => (header.x5t && c.sha1 === unpadded(header.x5t))
      || (header['x5t#S256'] && c.sha256 === unpadded(header['x5t#S256'])));
    if (!cert) {
      return refuse(700027, 'Client assertion failed signature validation. The key was not found: no certificate '
        + `with thumbprint '${header.x5t ?? header['x5t#S256'] ?? ''}' is registered for the application.`);
    }
    const data = `${parts[0]}.${parts[1]}`;
    const signature = Buffer.from(parts[2], 'base64url');
    let valid = false;
    if (header.alg === 'RS256') {
      valid = createVerify('RSA-SHA256').update(data).verify(cert.key, signature);
    } else if (header.alg === 'PS256') {
      valid = createVerify('RSA-SHA256').update(data).verify({
        key: cert.key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32,
      }, signature);
    }
    if (!valid) return refuse(700027, 'Client assertion failed signature validation.');
    const audiences = Array.isArray(payload.aud) ? payload.aud : [payload.aud];
    if (!audiences.includes(`${origin}${path}`)) {
      return refuse(700027, `Client assertion audience is invalid: expected '${origin}${path}'.`);
    }
    const now = Math.floor(Date.now() / 1000);
    // NumericDate allows fractions (MSAL sends time.time() + 600).
    if (!(Number.isFinite(payload.exp) && payload.exp > now)
      || (Number.isFinite(payload.nbf) && payload.nbf > now + 300)) {
      return refuse(700024, undefined);
    }
    // From here on the request stands for the client's own credential, as for a federated assertion.
    params.delete('client_assertion');
    params.delete('client_assertion_type');
    params.set('client_secret', clients.get(clientId).client_secret ?? '');
    return { refusal: undefined };
  }

  // --- the token endpoint ------------------------------------------------------------------------------------

  function exchangeResource(scope) {
    const items = String(scope ?? '').split(' ').filter(Boolean);
    if (items.length !== 1 || !items[0].endsWith('/.default')) return undefined;
    const resource = items[0].slice(0, -'/.default'.length);
    return EXCHANGE_RESOURCES.includes(resource) ? resource : undefined;
  }

  function lifetime(app) {
    if (app.ttl !== null) return app.ttl;
    return defaultTtl();
  }

  // Runs after server.mjs's token middleware (statistics, faults, Basic and assertion checks): answers the
  // client-credentials grant for Exchange in every tenant, and every request to another tenant's token endpoint.
  async function tokenEndpoint(ctx, next) {
    const tenant = ctx.method === 'POST' ? tenantOfTokenPath(ctx.path) : undefined;
    if (tenant === undefined) return next();
    const params = new URLSearchParams(typeof ctx.req.body === 'string' ? ctx.req.body : '');
    const grantType = params.get('grant_type');
    const resource = exchangeResource(params.get('scope'));
    const forExchange = String(params.get('scope') ?? '').includes('outlook.office');
    if (tenant === homeTenant && !(grantType === 'client_credentials' && forExchange)) {
      return next(); // delegated grants and other resources (Key Vault) stay with oidc-provider
    }
    if (grantType !== 'client_credentials') {
      // The other tenants here serve app-only tokens; sign-ins happen in the home tenant.
      sendEntraError(ctx, 400, 'unsupported_grant_type', 70003);
      return undefined;
    }
    const clientId = params.get('client_id') ?? '';
    const app = tenants.get(tenant).get(clientId);
    if (!app) {
      sendEntraError(ctx, 400, 'unauthorized_client', 700016, `Application with identifier '${clientId}' was not `
        + `found in the directory '${tenant}'. This can happen if the application has not been installed by the `
        + 'administrator of the tenant or consented to by any user in the tenant.');
      return undefined;
    }
    const secret = clients.get(clientId)?.client_secret;
    if (!secret || params.get('client_secret') !== secret) {
      sendEntraError(ctx, 401, 'invalid_client', 7000215);
      return undefined;
    }
    if (app.disabled) {
      sendEntraError(ctx, 400, 'unauthorized_client', 7000112, `Application '${clientId}' is disabled.`);
      return undefined;
    }
    if (resource === undefined) {
      sendEntraError(ctx, 400, 'invalid_scope', 1002012, `The provided value for scope ${params.get('scope')} is `
        + 'not valid. Client credential flows must have a scope value with /.default suffixed to the resource '
        + 'identifier (application ID URI).');
      return undefined;
    }
    const now = Math.floor(Date.now() / 1000);
    const expiresIn = lifetime(app);
    const oid = servicePrincipalId(clientId, tenant);
    const claims = {
      aud: resource,
      iss: issuerOf(tenant),
      iat: now,
      nbf: now,
      exp: now + expiresIn,
      appid: clientId,
      idtyp: 'app',
      oid,
      sub: oid,
      tid: tenant,
      uti: randomBytes(16).toString('base64url'), // Entra's token identifier: no two tokens are alike
      ver: '1.0',
    };
    if (app.roles.length > 0) {
      claims.roles = [...app.roles];
      claims.x_stand_in_roles = app.roles.join(' ');
    }
    issued += 1;
    ctx.status = 200;
    ctx.set('cache-control', 'no-store');
    ctx.body = { token_type: 'Bearer', expires_in: expiresIn, ext_expires_in: expiresIn, access_token: signJwt(claims) };
    return undefined;
  }

  // --- discovery of the other tenants, and the control API -----------------------------------------------------

  function discovery(tenant) {
    return {
      issuer: issuerOf(tenant),
      authorization_endpoint: `${origin}/${tenant}/oauth2/v2.0/authorize`,
      token_endpoint: `${origin}${tokenPath(tenant)}`,
      jwks_uri: `${origin}/${tenant}/discovery/v2.0/keys`,
      token_endpoint_auth_methods_supported: ['client_secret_post', 'private_key_jwt', 'client_secret_basic'],
      response_types_supported: ['code'],
      subject_types_supported: ['pairwise'],
      id_token_signing_alg_values_supported: ['RS256'],
      tenant_region_scope: 'EU',
    };
  }

  function tenantApps() {
    const out = {};
    for (const [tenant, apps] of tenants) {
      out[tenant] = Object.fromEntries([...apps].map(([clientId, app]) => [clientId, {
        ...app, service_principal_id: servicePrincipalId(clientId, tenant),
      }]));
    }
    return out;
  }

  function changeApp(body) {
    const tenant = body.tenant_id ?? homeTenant;
    if (!tenants.has(tenant)) return `unknown tenant_id ${tenant}`;
    if (!clients.has(body.client_id)) return 'client_id must name a configured client';
    const apps = tenants.get(tenant);
    if (body.consented === false) {
      apps.delete(body.client_id);
      return undefined;
    }
    const app = apps.get(body.client_id) ?? { roles: [], disabled: false, ttl: null };
    if (body.roles !== undefined) {
      if (!Array.isArray(body.roles) || !body.roles.every((r) => typeof r === 'string' && /^[A-Za-z.]+$/.test(r))) {
        return 'roles must be a list of role names';
      }
      app.roles = [...body.roles];
    }
    if (body.disabled !== undefined) {
      if (typeof body.disabled !== 'boolean') return 'disabled must be true or false';
      app.disabled = body.disabled;
    }
    if (body.ttl_seconds !== undefined) {
      if (body.ttl_seconds !== null && !(Number.isInteger(body.ttl_seconds) && body.ttl_seconds >= 1)) {
        return 'ttl_seconds must be a positive integer or null';
      }
      app.ttl = body.ttl_seconds;
    }
    apps.set(body.client_id, app);
    return undefined;
  }

  // Registered before server.mjs's control API: answers its own routes and the other tenants' discovery.
  function routes(readJson, jwks) {
    return async (ctx, next) => {
      const otherDiscovery = /^\/([^/]+)\/v2\.0\/\.well-known\/openid-configuration$/.exec(ctx.path);
      if (ctx.method === 'GET' && otherDiscovery && otherDiscovery[1] !== homeTenant
        && tenants.has(otherDiscovery[1])) {
        ctx.body = discovery(otherDiscovery[1]);
        return undefined;
      }
      const otherKeys = /^\/([^/]+)\/discovery\/v2\.0\/keys$/.exec(ctx.path);
      if (ctx.method === 'GET' && otherKeys && otherKeys[1] !== homeTenant && tenants.has(otherKeys[1])) {
        ctx.body = jwks(); // Entra signs every tenant's tokens with the same keys
        return undefined;
      }
      const route = `${ctx.method} ${ctx.path}`;
      if (route === 'GET /_control/app_tokens') {
        ctx.set('cache-control', 'no-store');
        ctx.body = { tenants: tenantApps(), issued };
        return undefined;
      }
      if (route === 'POST /_control/app_tokens') {
        ctx.set('cache-control', 'no-store');
        const problem = changeApp(await readJson(ctx));
        if (problem) {
          ctx.status = 400;
          ctx.body = { error: problem };
          return undefined;
        }
        ctx.body = { tenants: tenantApps(), issued };
        return undefined;
      }
      if (route === 'POST /_control/reset') {
        tenants = initialTenants();
        issued = 0;
      }
      return next();
    };
  }

  return { tokenEndpoint, routes, certificateAssertion, isOtherTenantTokenPath };
}
