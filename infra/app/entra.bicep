// The Entra app registration that mailboxes consent to (ENTRA_APP_MODE=create), declared with the Microsoft Graph
// extension for Bicep: the registration, its service principal (the enterprise application), tenant-wide admin consent
// for the delegated permissions, the federated credential that trusts the function app's managed identity and, for
// app-only mailboxes, the IMAP.AccessAsApp application role. Graph resources land in the tenant of the deployment.
//
// What the deployer needs in Entra (Microsoft's per-resource permission tables in the Graph Bicep reference): the
// Application Administrator or Cloud Application Administrator role, or the delegated Graph permissions
// Application.ReadWrite.All and DelegatedPermissionGrant.ReadWrite.All, plus AppRoleAssignment.ReadWrite.All with
// app-only on. Graph resources accept interactive deployments from Azure CLI and Azure PowerShell sign-ins only
// (Graph Bicep known issues); azd signs in with the Azure CLI's application id (azure-dev, pkg/auth/manager.go).
//
// The extension's alias is defined in ../bicepconfig.json (Microsoft's registry, pinned to a released version).
extension microsoftGraphV1

@description('Immutable client-provided key of the registration: a redeploy updates it, and azd down finds it by it.')
param uniqueName string
param displayName string

@description('Web redirect URIs: the deployed consent callback, and the local one when asked for.')
param redirectUris array

@allowed([
  'AzureADMyOrg'
  'AzureADMultipleOrgs'
])
@description('AzureADMultipleOrgs when the mailboxes live in another tenant than the managed identity.')
param signInAudience string = 'AzureADMyOrg'

@description('Trust the managed identity as the client credential (federated mode); false in secret mode.')
param trustManagedIdentity bool = true

@description('Principal (object) id of the function app\'s user-assigned identity: the federated credential\'s subject.')
param managedIdentityPrincipalId string

@description('Issuer of the managed identity\'s tokens: <login endpoint><tenant of the identity>/v2.0.')
param issuer string

@description('Audience of the token exchange: api://AzureADTokenExchange in the public cloud.')
param federatedAudience string = 'api://AzureADTokenExchange'

@description('Grant admin consent for the whole tenant; only meaningful when the mailboxes are in this tenant.')
param grantTenantWideConsent bool = true

@description('Assign IMAP.AccessAsApp of Office 365 Exchange Online (app-only mailboxes, no sign-in per mailbox).')
param appOnly bool = false

@description('Strings on the registration that mark it as created by this azd environment; azd down checks them.')
param appTags array = []

// Application ids of Microsoft's own resource apps, the same in every tenant. Microsoft Graph: the Graph permissions
// reference (learn.microsoft.com/graph/permissions-reference) reads the permissions off
// servicePrincipals(appId='00000003-0000-0000-c000-000000000000'). Office 365 Exchange Online: the resource of
// "APIs my organization uses > Office 365 Exchange Online" in "Authenticate an IMAP, POP or SMTP connection using
// OAuth" (learn.microsoft.com/exchange/client-developer/legacy-protocols/...), whose app id is
// 00000002-0000-0ff1-ce00-000000000000 in every tenant's service principal list.
var graphAppId = '00000003-0000-0000-c000-000000000000'
var exchangeOnlineAppId = '00000002-0000-0ff1-ce00-000000000000'

// Delegated Microsoft Graph permissions, the five the GLPI OAuth IMAP guide lists and Microsoft's IMAP OAuth guide
// adds under Microsoft Graph. Ids from the Microsoft Graph permissions reference (learn.microsoft.com/graph/
// permissions-reference, "Identifier", delegated column); `az ad sp show --id 00000003-0000-0000-c000-000000000000
// --query "oauth2PermissionScopes[].{value:value, id:id}"` lists the same in any tenant.
var graphDelegated = [
  {
    id: '652390e4-393a-48de-9484-05f9b1212954' // IMAP.AccessAsUser.All
    type: 'Scope'
  }
  {
    id: '7427e0e9-2fba-42fe-b0c0-848c9e6a8182' // offline_access
    type: 'Scope'
  }
  {
    id: '37f7f235-527c-4136-accd-4a02d197296e' // openid
    type: 'Scope'
  }
  {
    id: '64a6cdd6-aab1-4aaf-94b8-3cc8405e90d0' // email
    type: 'Scope'
  }
  {
    id: '14dad69e-099b-42c9-810b-d002981feec1' // profile
    type: 'Scope'
  }
]
var graphDelegatedScope = 'IMAP.AccessAsUser.All offline_access openid email profile'

// The token the app redeems names Exchange Online as its resource (https://outlook.office.com/IMAP.AccessAsUser.All),
// so the tenant-wide grant is recorded on Exchange Online too: the sign-in then finds consent for exactly the
// resource it asks for, and no mailbox sees a consent prompt. A grant names scopes by value, no id needed.
var exchangeDelegatedScope = 'IMAP.AccessAsUser.All'

// IMAP.AccessAsApp, the application role of Office 365 Exchange Online that Microsoft's IMAP OAuth guide names for
// the client credentials flow. Its id, 5e5addcd-3e8d-4e90-baf5-964efab2b20a, is not printed on a Microsoft page; it
// is the role's id in the Exchange Online service principal (`az ad sp show --id 00000002-0000-0ff1-ce00-000000000000
// --query "appRoles[?value=='IMAP.AccessAsApp'].id"`), the same in every tenant.
var imapAccessAsAppRoleId = '5e5addcd-3e8d-4e90-baf5-964efab2b20a' // IMAP.AccessAsApp

var exchangeAppOnly = [
  {
    resourceAppId: exchangeOnlineAppId
    resourceAccess: [
      {
        id: imapAccessAsAppRoleId
        type: 'Role'
      }
    ]
  }
]
var graphAccess = [
  {
    resourceAppId: graphAppId
    resourceAccess: graphDelegated
  }
]

resource graph 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: graphAppId
}

resource exchangeOnline 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: exchangeOnlineAppId
}

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: signInAudience
  tags: appTags
  notes: 'Created by azd for the M365 mail collector; azd down deletes it.'
  web: {
    redirectUris: redirectUris
    // Authorization code with PKCE only: no token comes back through the browser.
    implicitGrantSettings: {
      enableAccessTokenIssuance: false
      enableIdTokenIssuance: false
    }
  }
  requiredResourceAccess: appOnly ? concat(graphAccess, exchangeAppOnly) : graphAccess

  // The managed identity's token (audience api://AzureADTokenExchange) is the client assertion: no secret to store,
  // rotate or leak. The subject is the identity's principal (object) id, never its client id.
  resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = if (trustManagedIdentity) {
    name: '${app.uniqueName}/function-app-identity'
    description: 'The collector function app\'s user-assigned managed identity'
    issuer: issuer
    subject: managedIdentityPrincipalId
    audiences: [
      federatedAudience
    ]
  }
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

// Admin consent for every user of the tenant (consentType AllPrincipals): the delegated permissions, on each resource.
resource graphConsent 'Microsoft.Graph/oauth2PermissionGrants@v1.0' = if (grantTenantWideConsent) {
  clientId: servicePrincipal.id
  consentType: 'AllPrincipals'
  resourceId: graph.id
  scope: graphDelegatedScope
}

resource exchangeConsent 'Microsoft.Graph/oauth2PermissionGrants@v1.0' = if (grantTenantWideConsent) {
  clientId: servicePrincipal.id
  consentType: 'AllPrincipals'
  resourceId: exchangeOnline.id
  scope: exchangeDelegatedScope
}

// App-only mailboxes: the application permission, consented by assigning the role to the enterprise application.
// Exchange still needs New-ServicePrincipal and Add-MailboxPermission per mailbox (the postprovision hook prints them).
resource imapAccessAsApp 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (appOnly && grantTenantWideConsent) {
  appRoleId: imapAccessAsAppRoleId
  principalId: servicePrincipal.id
  resourceId: exchangeOnline.id
}

output clientId string = app.appId
output objectId string = app.id
output servicePrincipalId string = servicePrincipal.id
