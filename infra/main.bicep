// The whole collector for one azd environment: its resource group and everything in it.
// Identity-based access only: no storage keys, no connection strings with secrets, no client secret in settings.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; it seeds the unique names of all resources.')
param environmentName string

@minLength(1)
@description('Region of all resources; it must offer the Flex Consumption plan.')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; empty: rg-<environment name>.')
param resourceGroupName string = ''

@description('Object id of the deploying user or pipeline (azd fills it in); empty: no data-plane roles for it.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal behind principalId.')
param principalType string = 'User'

@description('Entra tenant (directory) id of the mailboxes; empty: the tenant of the deployment.')
param entraTenantId string = ''

@allowed([
  ''
  'create'
  'existing'
])
@description('create: this deployment registers the Entra app (Microsoft Graph extension); existing: you register it and set entraClientId. Empty: create, unless entraClientId is given.')
param entraAppMode string = ''

@description('Application (client) id of an existing Entra app registration (existing mode; docs/deploy.md).')
param entraClientId string = ''

@description('Create mode: also register http://localhost:7071/api/auth/callback, for a local run against the cloud.')
param entraLocalRedirectUri bool = false

@description('Create mode: assign IMAP.AccessAsApp of Office 365 Exchange Online, for app-only mailboxes.')
param entraAppOnly bool = false

@description('Entra authority host; change it only for a national cloud.')
param entraAuthorityHost string = 'https://login.microsoftonline.com'

@description('Redirect URI registered for the consent callback; empty: the function app default host name.')
param entraRedirectUri string = ''

@allowed([
  'federated'
  'secret'
])
@description('federated: the app registration trusts the managed identity (no secret anywhere). secret: a client secret kept in Key Vault.')
param entraCredentialMode string = 'federated'

@description('Name of the Key Vault secret that holds the client secret (secret mode only); you set its value yourself.')
param entraClientSecretName string = 'entra-client-secret'

@description('Comma-separated mail domains that may be registered as mailboxes; empty: any.')
param allowedMailDomains string = ''

param imapHost string = 'outlook.office365.com'
param imapPort int = 993
param imapScope string = 'https://outlook.office.com/IMAP.AccessAsUser.All'

@description('Six-field NCRONTAB schedule of the collector timer.')
param collectSchedule string = '0 */5 * * * *'

@minValue(1)
@maxValue(64)
param collectMaxConcurrency int = 8

@minValue(10)
@maxValue(1800)
@description('Overall time budget of one collector run, in seconds; keep it inside the schedule interval.')
param collectTimeBudgetSeconds int = 240

@minValue(64)
@maxValue(65536)
@description('Memory for mail in hand per worker, in MB, shared by the mailboxes it collects at once; keep it well below instanceMemoryMB.')
param collectMemoryBudgetMB int = 512

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_LRS'

@description('Purge protection on the Key Vault; it can never be switched off again once on.')
param keyVaultPurgeProtection bool = false

@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionInDays int = 7

@minValue(30)
@maxValue(730)
param logRetentionInDays int = 30

@description('Email address that receives the alerts; empty: the action group has no receiver.')
param alertEmail string = ''

@minValue(1)
@description('Alert when a mailbox has failed this many collector runs in a row.')
param consecutiveFailureThreshold int = 3

@description('Minutes without a completed collection run before the heartbeat alert fires: three periods of collectSchedule (change both together).')
@minValue(5)
@maxValue(1440)
param heartbeatWindowMinutes int = 15

@description('Hours an active mailbox may go without a successful collection before its alert fires.')
@minValue(1)
@maxValue(48)
param notCollectedHours int = 6

@minValue(1)
@description('Alert when the Entra client credential expires within this many days.')
param credentialExpiryWarningDays int = 30

param mailQueueName string = 'incoming-mail'
param workQueueName string = 'collect-work'
param mailContainerName string = 'raw-mail'
param leaseContainerName string = 'mailbox-leases'
param mailboxTableName string = 'mailboxes'
param consentTableName string = 'consentflows'

@description('GLPI REST API URL (https://<glpi>/apirest.php); empty: the GLPI ticket consumer stays disabled.')
param glpiUrl string = ''
@description('Key Vault secrets that hold the GLPI API client\'s App-Token and the GLPI user\'s API token.')
param glpiAppTokenSecretName string = 'glpi-app-token'
param glpiUserTokenSecretName string = 'glpi-user-token'
param glpiStateTableName string = 'glpitickets'
@description('Per-mailbox ticket options as JSON, e.g. {"support@contoso.com": {"entities_id": 1}}; see README.')
param glpiMailboxOptions string = '{}'

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = '${abbrs.webSitesFunctions}api-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
// Derived from the app's deterministic name, so that it can be registered before the app exists.
var redirectUri = empty(entraRedirectUri) ? 'https://${functionAppName}.azurewebsites.net/api/auth/callback' : entraRedirectUri
// The local host's callback, in the local stack and in the postprovision hook's local.settings.json.
var localRedirectUri = 'http://localhost:7071/api/auth/callback'
var useSecret = entraCredentialMode == 'secret'
var tenantId = empty(entraTenantId) ? tenant().tenantId : entraTenantId
// Sticky: the resolved mode is an output, which azd writes back as ENTRA_APP_MODE for the next provision and azd down.
var appMode = empty(entraAppMode) ? (empty(entraClientId) ? 'create' : 'existing') : entraAppMode
var createApp = appMode == 'create'
// A federated credential can trust a managed identity of its own tenant only (Microsoft: "Configure an application to
// trust a managed identity"). Mailboxes in another tenant need a multitenant registration in the identity's tenant,
// consented in theirs: a tenant-wide grant made here would land in the wrong tenant.
var crossTenant = tenantId != tenant().tenantId
// The token exchange audience follows the cloud (Microsoft: workload identity federation, national clouds).
var federatedAudiences = {
  AzureCloud: 'api://AzureADTokenExchange'
  AzureUSGovernment: 'api://AzureADTokenExchangeUSGov'
  AzureChinaCloud: 'api://AzureADTokenExchangeChina'
}
var entraAppUniqueName = 'm365-mail-collector-${resourceToken}'
var effectiveClientId = createApp ? entraApp.outputs.clientId : entraClientId

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? '${abbrs.resourcesResourceGroups}${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

// One user-assigned identity for everything the app reaches: storage, Key Vault, Application Insights, and
// (federated mode) the Entra app registration, which trusts it as its client credential.
module identity 'br/public:avm/res/managed-identity/user-assigned-identity:0.5.0' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}api-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'br/public:avm/res/storage/storage-account:0.32.1' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    kind: 'StorageV2'
    skuName: storageSkuName
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    dnsEndpointType: 'Standard'
    // Flex Consumption without VNet integration reaches storage over its public endpoint; Entra RBAC is the gate.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    blobServices: {
      // Soft delete keeps a mistakenly deleted raw message recoverable for a week.
      deleteRetentionPolicyEnabled: true
      deleteRetentionPolicyDays: 7
      containerDeleteRetentionPolicyEnabled: true
      containerDeleteRetentionPolicyDays: 7
      containers: [
        {
          name: deploymentContainerName
        }
        {
          name: mailContainerName
        }
        {
          name: leaseContainerName
        }
      ]
    }
    queueServices: {
      queues: [
        {
          name: mailQueueName
        }
        {
          name: workQueueName
        }
      ]
    }
    tableServices: {
      tables: [
        {
          name: mailboxTableName
        }
        {
          name: consentTableName
        }
      ]
    }
  }
}

module keyVault 'app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: '${abbrs.keyVaultVaults}${resourceToken}'
    location: location
    tags: tags
    enablePurgeProtection: keyVaultPurgeProtection
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionInDays
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    appInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module entraApp 'app/entra.bicep' = if (createApp) {
  name: 'entra-app'
  scope: rg
  params: {
    uniqueName: entraAppUniqueName
    displayName: 'M365 mail collector (${environmentName})'
    redirectUris: entraLocalRedirectUri ? [
      redirectUri
      localRedirectUri
    ] : [
      redirectUri
    ]
    signInAudience: crossTenant ? 'AzureADMultipleOrgs' : 'AzureADMyOrg'
    trustManagedIdentity: !useSecret
    managedIdentityPrincipalId: identity.outputs.principalId
    // The managed identity's tokens come from the deployment's tenant, whichever tenant the mailboxes are in.
    issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
    federatedAudience: federatedAudiences[environment().name]
    grantTenantWideConsent: !crossTenant
    appOnly: entraAppOnly
    appTags: [
      'azd-env-name:${environmentName}'
      'm365-mail-collector'
    ]
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.resourceId
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    keyVaultName: keyVault.outputs.name
    keyVaultUri: keyVault.outputs.uri
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    entraTenantId: tenantId
    entraClientId: effectiveClientId
    entraAuthorityHost: entraAuthorityHost
    entraRedirectUri: redirectUri
    entraClientSecretName: useSecret ? entraClientSecretName : ''
    allowedMailDomains: allowedMailDomains
    imapHost: imapHost
    imapPort: imapPort
    imapScope: imapScope
    collectSchedule: collectSchedule
    collectMaxConcurrency: collectMaxConcurrency
    collectTimeBudgetSeconds: collectTimeBudgetSeconds
    collectMemoryBudgetMB: collectMemoryBudgetMB
    mailQueueName: mailQueueName
    mailContainerName: mailContainerName
    workQueueName: workQueueName
    mailboxTableName: mailboxTableName
    consentTableName: consentTableName
    leaseContainerName: leaseContainerName
    glpiUrl: glpiUrl
    glpiAppTokenSecretName: glpiAppTokenSecretName
    glpiUserTokenSecretName: glpiUserTokenSecretName
    glpiStateTableName: glpiStateTableName
    glpiMailboxOptions: glpiMailboxOptions
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    appPrincipalId: identity.outputs.principalId
    userPrincipalId: principalId
    userPrincipalType: principalType
  }
}

module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    namePrefix: '${abbrs.insightsScheduledQueryRules}${resourceToken}'
    actionGroupName: '${abbrs.insightsActionGroups}${resourceToken}'
    location: location
    tags: tags
    appInsightsId: monitoring.outputs.appInsightsId
    alertEmail: alertEmail
    consecutiveFailureThreshold: consecutiveFailureThreshold
    credentialExpiryWarningDays: credentialExpiryWarningDays
    heartbeatWindowMinutes: heartbeatWindowMinutes
    notCollectedHours: notCollectedHours
  }
}

// azd writes these into the environment; the postprovision hook builds local.settings.json from them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output RESOURCE_GROUP string = rg.name
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = api.outputs.name
output SERVICE_API_NAME string = api.outputs.name
output SERVICE_API_URI string = api.outputs.uri
output KEY_VAULT_NAME string = keyVault.outputs.name
output KEY_VAULT_URI string = keyVault.outputs.uri
output AZURE_CLIENT_ID string = identity.outputs.clientId
output AZURE_MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.serviceEndpoints.blob
output AZURE_STORAGE_QUEUE_ENDPOINT string = storage.outputs.serviceEndpoints.queue
output AZURE_STORAGE_TABLE_ENDPOINT string = storage.outputs.serviceEndpoints.table
output APPLICATIONINSIGHTS_CONNECTION_STRING string = monitoring.outputs.connectionString
output ENTRA_TENANT_ID string = tenantId
output ENTRA_CLIENT_ID string = effectiveClientId
output ENTRA_APP_MODE string = appMode
// Empty unless this deployment created the registration: azd down deletes only a registration it finds by this name.
output ENTRA_APP_UNIQUE_NAME string = createApp ? entraAppUniqueName : ''
output ENTRA_SERVICE_PRINCIPAL_ID string = createApp ? entraApp.outputs.servicePrincipalId : ''
output ENTRA_APP_ONLY bool = entraAppOnly
output ENTRA_AUTHORITY_HOST string = entraAuthorityHost
output ENTRA_REDIRECT_URI string = redirectUri
output ENTRA_CREDENTIAL_MODE string = entraCredentialMode
output ENTRA_CLIENT_SECRET_NAME string = useSecret ? entraClientSecretName : ''
output ALLOWED_MAIL_DOMAINS string = allowedMailDomains
output IMAP_HOST string = imapHost
output IMAP_PORT int = imapPort
output IMAP_SCOPE string = imapScope
output COLLECT_SCHEDULE string = collectSchedule
output COLLECT_MAX_CONCURRENCY int = collectMaxConcurrency
output COLLECT_TIME_BUDGET_SECONDS int = collectTimeBudgetSeconds
output COLLECT_MEMORY_BUDGET_MB int = collectMemoryBudgetMB
output MAIL_QUEUE_NAME string = mailQueueName
output WORK_QUEUE_NAME string = workQueueName
output MAIL_CONTAINER_NAME string = mailContainerName
output LEASE_CONTAINER_NAME string = leaseContainerName
output MAILBOX_TABLE_NAME string = mailboxTableName
output CONSENT_TABLE_NAME string = consentTableName
output GLPI_URL string = glpiUrl
output GLPI_STATE_TABLE_NAME string = glpiStateTableName
output GLPI_MAILBOX_OPTIONS string = glpiMailboxOptions
