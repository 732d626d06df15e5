// Optional (main.bicep: createEntraApp): the Entra app registration the consent flow signs mailboxes in with.
// Needs a deployer allowed to create applications (Application.ReadWrite.All or Application Developer); admin consent
// for the delegated permissions is still given once, by an admin, on the first sign-in or in the portal.
extension microsoftGraphV1

@description('Immutable unique name of the application object (lets a redeploy update it instead of adding one).')
param uniqueName string
param displayName string

@description('The deployed consent callback, https://<app>.azurewebsites.net/api/auth/callback.')
param redirectUri string

@description('Trust the managed identity as the client credential (federated mode); false in secret mode.')
param trustManagedIdentity bool = true
param managedIdentityPrincipalId string

@description('Token issuer of the tenant, https://login.microsoftonline.com/<tenant id>/v2.0.')
param issuer string

var graphAppId = '00000003-0000-0000-c000-000000000000'

// Delegated Microsoft Graph permissions, as the GLPI OAuth IMAP guide lists them.
var delegatedScopes = [
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
    id: '14dad69e-099b-42c9-810b-d002981feec1' // profile
    type: 'Scope'
  }
  {
    id: '64a6cdd6-aab1-4aaf-94b8-3cc8405e90d0' // email
    type: 'Scope'
  }
]

resource app 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: uniqueName
  displayName: displayName
  signInAudience: 'AzureADMyOrg'
  web: {
    redirectUris: [
      redirectUri
    ]
    implicitGrantSettings: {
      enableAccessTokenIssuance: false
      enableIdTokenIssuance: false
    }
  }
  requiredResourceAccess: [
    {
      resourceAppId: graphAppId
      resourceAccess: delegatedScopes
    }
  ]

  // The managed identity's token (audience api://AzureADTokenExchange) becomes the client assertion: no secret
  // to store, rotate or leak, and nothing expires.
  resource managedIdentityCredential 'federatedIdentityCredentials@v1.0' = if (trustManagedIdentity) {
    name: '${app.uniqueName}/function-app-identity'
    description: 'The collector function app\'s user-assigned managed identity'
    audiences: [
      'api://AzureADTokenExchange'
    ]
    issuer: issuer
    subject: managedIdentityPrincipalId
  }
}

resource servicePrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: app.appId
}

output clientId string = app.appId
output objectId string = app.id
output servicePrincipalId string = servicePrincipal.id
